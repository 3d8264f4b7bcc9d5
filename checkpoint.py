"""Files on disk: every writer in the repo goes through `atomic_write`; checkpoints are
read with weights_only=True (plain data: no code from the file runs).

`atomic_write` writes: to a temporary name in the same directory,
flushed to disk, then renamed over the final name. A crash at any moment leaves either
the previous complete file or the new one, never half of one.
"""

import fcntl
import hashlib
import json
import os
import pickle
import socket
import tempfile

import torch


# ----------------------------------------------------------------------------- writing
def atomic_write(path, write, text=False):
    """Call write(f) on a fresh temporary file beside `path`, fsync it, rename it over
    `path` and fsync the directory, so the rename itself survives a power cut."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = write_error(e)
        if cause is None:
            raise
        kept = f"the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else "nothing was written"
        raise OSError(f"writing {path} failed ({cause}): {kept}; is the disk full, or a file-size limit (ulimit -f) "
                      f"set?") from None
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_error(e):
    """Why a write failed, when it did: an OSError's reason, also where torch.save wraps it in a
    RuntimeError of its zip writer; None for any other exception (a bug: its traceback stays)."""
    while e is not None:
        if isinstance(e, OSError):
            return e.strerror or str(e)
        if isinstance(e, RuntimeError) and "PytorchStreamWriter" in str(e):
            return str(e).splitlines()[0]
        e = e.__cause__ or e.__context__
    return None


def write_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), text=True)


def read_json(path, what="file"):
    """A JSON file, or one line saying which file is missing or malformed and where."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found ({what})")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def json_lines(f, path):
    """(line number, object) for each non-blank line of an open JSON-lines file; a bad line
    is one ValueError naming the file and the line."""
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None


def save_tensors(tensors, path, metadata=None):
    """A dict of tensors as one safetensors file, written atomically."""
    from safetensors.torch import save
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_figure(fig, path, dpi=110):
    """A matplotlib figure as PNG, atomically, then closed."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path):
    """torch.load with weights_only=True (no code from the file runs), with clear errors."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0].split(". ")[0][:160]  # torch's first sentence, not its advice
        refused = " (refused: unpickling objects other than tensors and plain data could run code)" \
            if isinstance(e, pickle.UnpicklingError) else ""
        raise ValueError(f"checkpoint {path} is corrupt, truncated or not a plain-data checkpoint{refused} "
                         f"({type(e).__name__}: {reason})") from None
    if isinstance(ckpt, dict) and "config" in ckpt and "model_config" not in ckpt:
        ckpt["model_config"] = ckpt.pop("config")  # the key's name before 2026-11
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' and 'model_config' entries: not written by train.py")
    return ckpt


def check_same_config(ckpt_config, requested, path):
    """A resumed run keeps its checkpoint's model: say which requested field differs."""
    for key, value in requested.items():
        if ckpt_config.get(key) != value:
            raise ValueError(f"checkpoint {path} was trained with {key}={ckpt_config.get(key)!r} but the config "
                             f"asks for {key}={value!r}; drop that override or use another out_dir")


def fingerprint(paths):
    """sha256 of the files' names and contents (missing files count as absent): the
    identity of a tokenizer (meta.json, tokenizer.tiktoken) or of a base checkpoint."""
    h = hashlib.sha256()
    for path in sorted(paths):
        if os.path.exists(path):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def tokenizer_files(folder):
    """meta.json and the tokenizer file it names (tokenizer.tiktoken, .json or .model)."""
    meta_path = os.path.join(folder, "meta.json")
    named = read_json(meta_path).get("tokenizer_file") if os.path.exists(meta_path) else None
    return ["meta.json"] + ([named] if named else [])


def tokenizer_fingerprint(folder):
    return fingerprint([os.path.join(folder, n) for n in tokenizer_files(folder)])


# ----------------------------------------------------------------------------- one run per out_dir
def lock_out_dir(out_dir):
    """Hold out_dir/.lock (an fcntl lock, with our pid written in it) until the process
    exits. A second run into the same out_dir is refused with the holder's pid; the
    kernel drops the lock of a process that died, so a stale lock file never blocks."""
    path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"out_dir {out_dir} is in use by {holder}; wait for it to finish or choose "
                           f"another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _locks[os.path.abspath(out_dir)] = f  # kept open: closing the file would release the lock
    return f


def unlock_out_dir(out_dir):
    """Release the lock and remove the lock file: a finished run leaves only its results."""
    f = _locks.pop(os.path.abspath(out_dir), None)
    if f is not None:
        os.remove(os.path.join(out_dir, ".lock"))
        f.close()


_locks = {}
