"""
Plumbing shared by the stage scripts, and nothing else (the algorithms live in their own files).
config overrides, device/dtype, several processes (torchrun), seeding, tokenizers, JSON lines, downloads, checkpoints,
logging, the lr schedule.
"""
import ast
import atexit
import dataclasses
import difflib
import errno
import glob
import gzip
import importlib.util
import inspect
import json
import math
import os
import sys
import types
import typing
import urllib.request
from contextlib import contextmanager, nullcontext

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# ----------------------------------------------------------------------------- config: --key=value over a dataclass

def parse_config(config_cls, argv=None):
    """Build `config_cls()` and override fields from `--key=value` arguments. `--help` prints the Config source,
    whose trailing comments are the documentation. Bad keys and values raise ValueError naming the key."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(inspect.getsource(config_cls))
        sys.exit(0)
    cfg = config_cls()
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"argument {arg!r} must look like --key=value")
        key, eq, text = arg[2:].partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ValueError(f"unknown key --{key}" + (f"; did you mean --{close[0]}?" if close else ""))
        if not eq and hints[key] is bool:
            text = "True"  # a bare --flag switches a bool on
        setattr(cfg, key, _coerce(key, text, hints[key]))
    return cfg

def run(main, config_cls):
    """Entry point of every script: parse --key=value into config_cls, run main, and report bad input (a ValueError
    whose message names the file/line/key), a run gone non-finite (FloatingPointError) or a failed read or write
    (an OSError: missing file, disk full, permission denied) as one line on stderr, not a traceback."""
    try:
        main(parse_config(config_cls))
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the OS's words, lower-cased, after the path: "out/x/ckpt.pt: no space left on device"
        sys.exit(f"error: {e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}" if e.filename and e.strerror
                 else f"error: {e}")
    finally:
        if dist.is_initialized():  # under torchrun: leave the process group cleanly (nanoGPT does the same)
            dist.destroy_process_group()

def check_range(cfg, keys, low, *, strict=False, high=None):
    """Range-check settings up front (each script's check_config): every key's value must be >= low (> low if
    strict) and <= high if given; None means "off" and passes. The first that fails raises a ValueError naming it."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and (value < low or (strict and value == low) or (high is not None and value > high)):
            bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"--{key}={value}: must be {bound}")

def check_finite(where, record):
    """Stop a run whose logged numbers (loss, KL, scores) went nan or inf, at the sync point that computed them and
    before anything trained on them is saved: a non-finite model is worse than none."""
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"{where}: {key} is {value}; stopped before saving it (try a lower --lr)")

def _coerce(key, text, hint):
    # Optional[X] is Union[X, None]: parse as X unless the value is None.
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # Optional[int] or int | None
    target = args[0] if is_union and len(args) == 1 else hint
    if text == "None" and target is not hint:
        return None
    if target is str:
        return text  # strings need no quotes on the command line
    if target is bool and text in ("True", "False", "1", "0", "true", "false"):
        return text in ("True", "1", "true")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--{key}={text}: expected {getattr(target, '__name__', target)}") from None
    if target is float and type(value) is int:
        value = float(value)
    if target is float and type(value) is float and not math.isfinite(value):
        raise ValueError(f"--{key}={text}: expected a finite number")
    if type(value) is not target:
        raise ValueError(f"--{key}={text}: expected {target.__name__}, got {type(value).__name__}")
    return value

# ----------------------------------------------------------------------------- device, dtype, seeding

def setup_device(device="auto", dtype="auto", compile=False):
    """Decide device and dtype once, print them on one line, and return (device, dtype, autocast ctx)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]  # "cuda:0" is a CUDA device too, and gets its bf16
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype}: expected auto, float32 or bfloat16 (there is no fp16 path)")
    # Weights stay fp32; bf16 only enters through autocast, as in nanoGPT.
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if device_type == "cuda" and dtype == "float32":
        # TF32 speeds up an fp32 run's matmuls. Not under bf16: there the only fp32 matmuls left are the LM and
        # scalar heads, kept in fp32 on purpose (model.GPT.lm_logits), and TF32 would round their inputs again.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device {device} | dtype {dtype} | compile {compile}")
    return device, dtype, ctx

def peak_memory(device):
    """{"memory/peak_gib": the most CUDA memory this process has held in tensors so far} for a stage's log record
    and printed line, or {} off CUDA, where PyTorch does not count it."""
    if not str(device).startswith("cuda"):
        return {}
    return {"memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}

def set_seed(seed):
    torch.manual_seed(seed)

# ----------------------------------------------------------------------------- several processes: torchrun + DDP

def setup_distributed(device="auto"):
    """One process per GPU (or CPU worker) under torchrun, as nanoGPT's train.py does it. torchrun sets RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we then start the process group (nccl on CUDA, gloo on CPU)
    and put each process on GPU number LOCAL_RANK. Without RANK this is one plain process.
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"RANK is set but not {', '.join(missing)}: there is no process group to join; start "
                         f"several processes with torchrun (torchrun --standalone --nproc_per_node=N ...), or "
                         f"unset RANK to run one")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # LOCAL_RANK counts the processes on this node
        torch.cuda.set_device(device)
    elif device != "cpu":
        raise ValueError(f"--device={device}: several processes run on cuda (nccl) or cpu (gloo) only")
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device

def one_process_only(script):
    """For the scripts that do not split their work (evaluation, DPO): under torchrun they would run N copies that
    overwrite each other's output, so they say so instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{script} runs as one process: start it with python, not torchrun "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")

def _is_distributed():
    return dist.is_initialized() and dist.get_world_size() > 1

def all_reduce_sum(x):
    """x summed over all processes, as a new tensor (x itself in one process). Every process must call it, in the
    same order: it is how a statistic over the global batch is computed from each process's share."""
    if not _is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x

def wrap_ddp(model, device):
    """A model that trains, wrapped in DDP, which averages its gradients over the processes during backward (and
    copies rank 0's weights to all at wrapping). Frozen models are never wrapped: they have no gradients to share.
    One process: the model itself. Keep the unwrapped model for saving and sampling (nanoGPT's raw_model)."""
    if not _is_distributed():
        return model
    return DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

def sync_gradients(model, now):
    """Whether DDP shares gradients in the model's next backward (nanoGPT's require_backward_grad_sync): in gradient
    accumulation only the last micro-step's needs to, the others add to the local gradients. No-op unwrapped."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = now

# ----------------------------------------------------------------------------- tokenizers (tiktoken only)

EOT = "<|endoftext|>"
# r50k's (GPT-2's) split pattern: it matches every character, so no text is ever silently dropped.
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def get_tokenizer(name):
    """`gpt2` (50257 ids) or `bytes`: one token per UTF-8 byte plus <|endoftext|> = 256 (257 ids, no download).
    Encode user text with `encode_ordinary`, so a literal "<|endoftext|>" in the data stays text."""
    if name == "gpt2":
        return tiktoken.get_encoding("gpt2")
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=_R50K_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})
    raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'bytes'")

# ----------------------------------------------------------------------------- data files: JSON lines

def read_jsonl(path, fields=(), with_lineno=False):
    """Read a JSON-lines file (gzip too, by its .gz name); every row must be an object holding `fields` as strings.
    Errors name the place: `data/x.jsonl:17: field 'chosen' missing`, `data/x.jsonl:3: not valid UTF-8`, and a file
    with no rows is an error too. with_lineno=True gives (line, row) pairs, so callers that check more fields can
    name the line too (blank lines are skipped, so rows and lines differ)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    try:  # bytes, decoded line by line, so a bad byte is reported with its line rather than as a bare codec error
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            lines = list(f)
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        for field in fields:
            if field not in row:
                raise ValueError(f"{path}:{lineno}: field {field!r} missing")
            if not isinstance(row[field], str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string")
        rows.append((lineno, row) if with_lineno else row)
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return rows

def val_path_for(train_path):
    """The val file beside a train file: data/x/prefs_train.jsonl -> data/x/prefs_val.jsonl. Only the file name
    changes, so a folder whose name holds "_train" is left alone. A name without "_train" has no val file to find,
    and training on a file while validating on itself would hide over-fitting, so that is an error."""
    folder, name = os.path.split(train_path)
    if "_train" not in name:
        raise ValueError(f"{train_path}: the name has no '_train', so there is no val file beside it to find; "
                         f"pass the validation file with --val_data (--val_prompts for ppo)")
    return os.path.join(folder, name.replace("_train", "_val"))

@contextmanager
def atomic_write(path, mode="w"):
    """Open a temp file beside `path` for writing, and rename it over `path` only once it is completely written,
    so a crash or a full disk mid-write leaves the old file (or none) but never a truncated one. Temp files that
    dead processes left behind (killed mid-write) are removed first. A full disk or a refused write is re-raised
    naming `path` itself, which common.run prints as one line."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        pid = stale[len(path) + 4:]
        if pid.isdigit() and not is_alive(int(pid)):
            os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with naming(path), open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:  # a failed write leaves neither a half-written file nor its temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)

@contextmanager
def naming(path):
    """Re-raise a full disk or a refused write as an OSError naming `path`: a failed write() names no file."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise

def is_alive(pid):
    """Whether process `pid` is running (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True

def write_jsonl(path, rows):
    """Write rows as JSON lines (raw UTF-8), atomically."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

def write_json(path, obj, indent=2):
    """Write one JSON document (eval.json, samples.json), atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)

def read_json(path):
    """Read one JSON document; a missing or damaged file is a one-line error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e.reason})") from None

def download(url, path):
    """Fetch `url` to `path` with the standard library. Bytes go to `path.part` and are renamed only when the
    whole file has arrived, so an interrupted download never leaves a file that looks complete."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        with tqdm(total=total or None, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        received = f.tell()
    if total and received != total:
        raise OSError(f"{url}: connection closed after {received:,} of {total:,} bytes; run again to retry")
    os.replace(part, path)
    return path

# ----------------------------------------------------------------------------- checkpoints and logs

CKPT_KINDS = ("policy", "reward", "value")

def save_checkpoint(path, ckpt):
    """Save a dict of tensors and plain values, atomically (atomic_write): a crash mid-write leaves the previous
    checkpoint intact. Weights holding nan or inf are refused, so a diverged run never replaces a good model.
    torch.save writes through a Python file, so a full disk is an OSError naming the file, not a C++ assert."""
    assert ckpt.get("kind") in CKPT_KINDS, f"checkpoint kind must be one of {CKPT_KINDS}"
    for name, state in ckpt.items():
        if isinstance(state, dict) and not all(torch.isfinite(t).all() for t in state.values()
                                               if torch.is_tensor(t) and t.is_floating_point()):
            raise FloatingPointError(f"{path}: {name} weights hold nan or inf; not saved (try a lower --lr)")
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)

def load_checkpoint(path, kind=None):
    """Load a checkpoint written by save_checkpoint (a run folder works too), checking its kind if given."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a nanoInstruct checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in CKPT_KINDS:
        raise ValueError(f"{path}: not a nanoInstruct checkpoint (no 'kind' field)")
    if kind is not None and ckpt["kind"] not in ((kind,) if isinstance(kind, str) else kind):
        raise ValueError(f"{path}: is a {ckpt['kind']} checkpoint, expected {kind}")
    return ckpt

def log(run_dir, record):
    """Append one JSON line to out/<run>/log.jsonl: the machine-readable twin of the printed line."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "log.jsonl")
    with naming(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

# ----------------------------------------------------------------------------- run folders: never lose a run

def prepare_run_dir(out_dir, resume=None, overwrite=False):
    """Called at the top of every training stage's main. A folder holding a checkpoint is only reused with --resume
    (continue it) or --overwrite (replace it; its old log.jsonl is cleared so two runs' lines never mix), and a folder
    a live run is writing to is refused: out_dir/run.lock holds the owner's pid, is taken over when that process is
    gone, and is removed when this one exits. Under torchrun only rank 0 writes, so only it takes the lock.
    resume=None: the stage has no --resume (reward.py, dpo.py)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: give one (continue the run in out_dir, or replace it)")
    if os.path.exists(ckpt_path) and not (resume or overwrite):
        raise ValueError(f"{ckpt_path}: a run is saved here; pass " + ("--resume to continue it, " if resume is not None
                         else "") + "--overwrite to replace it, or another --out_dir")
    if int(os.environ.get("RANK", 0)) != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    lock, mine = os.path.join(out_dir, "run.lock"), os.getpid()
    with atomic_write(f"{lock}.{mine}") as f:  # written whole first, so a reader never sees an empty lock
        f.write(str(mine))
    try:
        while True:
            try:
                os.link(f"{lock}.{mine}", lock)  # atomic: fails if the lock exists
                atexit.register(lambda: read_pid(lock) == mine and os.remove(lock))
                break
            except FileExistsError:
                owner = read_pid(lock)
                if owner == mine:  # this process took it already (main called twice, as tests do)
                    break
                if owner is not None and is_alive(owner):
                    raise ValueError(f"{out_dir}: in use by a live run (pid {owner}, see {lock}); wait for it, pick "
                                     f"another --out_dir, or delete the lock if that pid is not a run") from None
                print(f"{lock}: taking over the lock of pid {owner}, which is no longer running")
                if read_pid(lock) == owner:  # still the stale one, not a lock another process just took
                    os.remove(lock)
    finally:
        os.remove(f"{lock}.{mine}")
    if overwrite and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))

def read_pid(lock):
    """The pid in a lock file, or None if it is gone or unreadable."""
    try:
        with open(lock) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None

def resume_checkpoint(out_dir, needs):
    """The checkpoint --resume continues from, checked to hold what this stage saves (`needs`: sft's 'data_rng', a
    PPO run's 'value_model'), so another stage's checkpoint is a one-line error. Log lines after its step are cut
    (a run killed after logging step 12 but saving at 10 replays 11 and 12; they must not be logged twice)."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, "policy")
    missing = [key for key in needs if key not in ckpt]
    if missing:
        raise ValueError(f"{path}: this checkpoint has no {missing[0]!r}, so another stage wrote it; it cannot be "
                         f"resumed here")
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log_path) and int(os.environ.get("RANK", 0)) == 0:
        with open(log_path, encoding="utf-8") as f:
            lines = [line for line in f if line.endswith("\n")]  # a line cut by the kill is dropped too
        write_jsonl(log_path, [r for r in map(json.loads, lines) if r.get("step", 0) <= ckpt["step"]])
    return ckpt

def get_lr(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * max_lr (nanoGPT's schedule)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * coeff)

def load_labeler(data_path):
    """The scripted labeler of a built-in task (`labeler.py` beside its data files), or None for real data,
    which has no gold judge. Loaded from the file so data folders need not be packages."""
    path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "labeler.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"labeler_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
