"""
The run's folder on disk: the lock that keeps a second run out of output_dir, which checkpoints are complete
and intact, how old ones are rotated, and what to resume from. The Trainer (trainer.py) writes the checkpoint
files; this module decides which ones count.
"""

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import zipfile
from dataclasses import fields
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from backbones import TINY
from model import CONFIG_NAME, WEIGHTS_NAME, SlamASRConfig
from processor import write_text_atomic

logger = logging.getLogger("finetune")
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is a torn write
LOCK_NAME = ".finetune.lock"  # in output_dir, held by the run writing there


def checkpoint_is_complete(path):
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def clear_stale_checkpoint(path, should_save=True):
    """A checkpoint-N about to be written where a run that went past this step left one (this run resumed from
    before it) is removed first: its marker would vouch for a mix of its files and ours if we were killed
    halfway through writing."""
    if should_save and os.path.isdir(path):
        logger.warning(f"replacing {path}, written by an earlier run that went past this step")
        shutil.rmtree(path)


def mark_complete(path, global_step):
    write_text_atomic(os.path.join(path, COMPLETE_MARKER), json.dumps({"global_step": global_step}))


@contextlib.contextmanager
def hold_output_dir(output_dir, holder=True):
    """An exclusive lock on output_dir for the run's life: a second run into it fails at once instead of mixing
    its checkpoints with ours. Held by the process that writes checkpoints (`holder`; rank 0, or each node's
    first process with --save_on_each_node). An fcntl.flock on the folder itself, which a stray `rm` cannot take
    away, and which the kernel drops when the process dies, SIGKILL included (the filelock package's fallback
    soft lock would stay behind stale). LOCK_NAME in it only says who holds it."""
    if not holder:
        yield
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        folder = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:  # a user's path: one line that says what is wrong with it, not errno's words alone
        raise OSError(f"--output_dir {output_dir}: {output_dir_problem(output_dir, e)}; choose another place") from None
    info = os.path.join(output_dir, LOCK_NAME)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_line = open(info).read().strip() if os.path.isfile(info) else ""
            raise RuntimeError(f"{output_dir} is in use by another run ({holder_line or 'holder unknown'}): "
                               "wait for it to end, or choose another --output_dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts): warn, do not refuse to train
            logger.warning(f"cannot lock {output_dir} ({e}): nothing stops a second run from writing into it")
        else:
            try:  # the run's first write there: a read-only mount or another user's folder says so now
                write_text_atomic(info, f"pid {os.getpid()} on {socket.gethostname()}, since "
                                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            except OSError as e:
                raise OSError(f"--output_dir {output_dir}: cannot write in it ({e.strerror}); choose another "
                              "place") from None
        yield
    finally:
        os.close(folder)


def output_dir_problem(output_dir, error):
    """What `error` (from making or opening output_dir) says of the path, in words."""
    if not output_dir:
        return "empty"
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        return f"a symbolic link to {os.readlink(output_dir)}, which does not exist"
    if os.path.isfile(output_dir):
        return "a file, not a folder"
    if os.path.lexists(output_dir):
        return "exists and is not a folder (a pipe, a device or a socket)"
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        return "a part of the path is a file, not a folder"
    return f"cannot be created here ({error.strerror})"


def find_checkpoints(output_dir):
    """(complete, torn) checkpoint folders of output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return [], []
    # checkpoint-<digits> folders only: a user's checkpoint-best or checkpoint-4.bak is none of ours
    steps = {n: int(m.group(1)) for n in os.listdir(output_dir)
             if (m := re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-(\d+)", n))
             and os.path.isdir(os.path.join(output_dir, n))}
    paths = [os.path.join(output_dir, n) for n in sorted(steps, key=steps.get)]
    return [p for p in paths if checkpoint_is_complete(p)], [p for p in paths if not checkpoint_is_complete(p)]


def checkpoint_problem(path):
    """Why a complete checkpoint cannot be resumed from (a file missing, truncated or unparsable), or None.
    Trainer resumes with a fresh optimizer and the LR at its peak when optimizer.pt or scheduler.pt is missing,
    so they are required. Reads no pickle: a torch.save file is a zip archive whose checksums give away a
    truncated or damaged file."""
    if os.path.isfile(os.path.join(path, "latest")):  # DeepSpeed: its engine files hold the optimizer state
        with open(os.path.join(path, "latest")) as f:
            tag = f.read().strip()
        required = [os.path.join(tag, "mp_rank_00_model_states.pt")]
        if not glob(os.path.join(path, tag, "*optim_states.pt")):
            return f"{tag}/ holds no DeepSpeed optimizer states (*optim_states.pt)"
    else:
        required = [OPTIMIZER_NAME, SCHEDULER_NAME]
    for name in (WEIGHTS_NAME, CONFIG_NAME, TRAINER_STATE_NAME, *required):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        with safe_open(os.path.join(path, WEIGHTS_NAME), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        return f"{WEIGHTS_NAME} is unreadable ({e})"
    try:
        SlamASRConfig.from_json_file(os.path.join(path, CONFIG_NAME))
    except ValueError as e:  # the message names the file
        return str(e)
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except ValueError as e:
        return f"{TRAINER_STATE_NAME} is not valid JSON ({e})"
    for file in sorted(glob(os.path.join(path, "**", "*.pt*"), recursive=True)):
        name = os.path.relpath(file, path)
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{name} is truncated or not a torch.save file ({e})"
        if damaged:
            return f"{name} is damaged ({damaged} fails its checksum)"
    return None


def rotate_checkpoints(run_dir, limit, keep, best=None):
    """Trainer's rotation, but only once the new checkpoint is complete (a kill in between must not leave
    nothing to resume from) and only over our complete checkpoint-<N> folders, oldest step first; `keep`
    (the one just saved) and `best` (the best model's) are never deleted."""
    if not limit:
        return
    complete, _ = find_checkpoints(run_dir)
    protected = {os.path.abspath(p) for p in (keep, best) if p}
    deletable = [p for p in complete if os.path.abspath(p) not in protected]
    for path in deletable[:max(len(complete) - max(limit, len(protected)), 0)]:
        logger.info(f"deleting {path} (--save_total_limit {limit})")
        shutil.rmtree(path)


def config_differences(saved, current):
    """'field: checkpoint X, this run Y' for each SlamASRConfig field that differs. A field this run has left
    None is filled in when the backbones load, so there is nothing to compare yet. A backbone folder named two
    ways (relative and absolute, `./enc` and `enc`) is one backbone."""
    return [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, this run {getattr(current, f.name)!r}"
            for f in fields(SlamASRConfig)
            if getattr(current, f.name) is not None and getattr(saved, f.name) != getattr(current, f.name)
            and not (f.name in ("encoder", "llm") and same_folder(getattr(saved, f.name), getattr(current, f.name)))]


def same_folder(a, b):
    # `tiny` names the random backbones, never a folder that happens to be called so
    return TINY not in (a, b) and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def checkpoint_step(path):
    return int(re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-(\d+)", os.path.basename(os.path.normpath(path))).group(1))


def set_aside(paths, why):
    """Renames checkpoints that must no longer count (`last` would take them) to <name>.superseded[-N]."""
    for path in paths:
        target, n = f"{path}.superseded", 1
        while os.path.exists(target):
            n += 1
            target = f"{path}.superseded-{n}"
        logger.warning(f"moving {path} aside to {target}: {why}")
        os.rename(path, target)


def resolve_resume(training_args, config):
    """--resume_from_checkpoint PATH or `last` (the newest intact checkpoint); refuses torn or broken
    checkpoints, silently mixed runs, a checkpoint of another model config than `config`, and a learning rate that
    the checkpoint's schedule would ignore. Checkpoints past the one resumed from are set aside: they belong to
    the attempt being replaced, and `last` must mean this run's newest."""
    complete, torn = find_checkpoints(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is None:
        if complete:
            raise ValueError(f"{training_args.output_dir} already holds {os.path.basename(complete[-1])}: pass "
                             "--resume_from_checkpoint last to continue that run, or choose another --output_dir")
        return None
    if resume in ("last", "true", "True"):
        if not complete:
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {training_args.output_dir}")
        skipped = []
        for path in reversed(complete):
            problem = checkpoint_problem(path)
            if problem is None:
                break
            logger.warning(f"--resume_from_checkpoint {resume}: skipping {path}: {problem}")
            skipped.append(f"{os.path.basename(path)}: {problem}")
        else:
            raise ValueError(f"--resume_from_checkpoint {resume}: no intact checkpoint in {training_args.output_dir} "
                             f"({'; '.join(skipped)})")
        resume = path
    elif not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: {'a file' if os.path.exists(resume) else 'no such folder'}"
                         f"; pass a checkpoint-N folder, or `last` for the newest intact one in --output_dir")
    elif not checkpoint_is_complete(resume):
        raise ValueError(f"{resume} is not a complete checkpoint (no {COMPLETE_MARKER}: the run was killed while "
                         "saving it, or it is not a checkpoint folder); resume from an earlier one")
    elif problem := checkpoint_problem(resume):
        raise ValueError(f"cannot resume from {resume}: {problem}; resume from an earlier checkpoint (`last` "
                         "takes the newest intact one)")
    differences = config_differences(SlamASRConfig.from_json_file(os.path.join(resume, CONFIG_NAME)), config)
    if differences:
        raise ValueError(f"{resume} was trained with another model config than this run's: "
                         + "; ".join(differences) + ". Pass the checkpoint's values (the same command as its run), "
                         "or start a new --output_dir")
    scheduler = os.path.join(resume, SCHEDULER_NAME)
    if os.path.isfile(scheduler):  # Trainer restores the checkpoint's schedule, base learning rate included
        base = torch.load(scheduler, weights_only=True)["base_lrs"][0]
        if not math.isclose(base, training_args.learning_rate, rel_tol=1e-6):
            raise ValueError(f"--learning_rate {training_args.learning_rate:g}: {resume} continues a schedule that "
                             f"started from {base:g}, which a resume keeps; pass --learning_rate {base:g}, or start a "
                             "new --output_dir for another rate")
    if training_args.should_save:
        for path in torn:  # half-written by a killed run; left in place they would be rotated in as if good
            logger.warning(f"removing incomplete checkpoint {path}")
            shutil.rmtree(path)
        later = [p for p in complete if checkpoint_step(p) > checkpoint_step(resume)]
        set_aside(later, f"this run resumes from the earlier {os.path.basename(resume)}")
    return resume
