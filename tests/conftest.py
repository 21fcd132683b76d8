import io
from pathlib import Path

import psutil
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def processes_with(*needles: str) -> set[int]:
    """PIDs of the processes whose command line contains one of ``needles``; compared before
    and after a tool runs, to show it stopped everything it started."""
    found = set()
    for proc in psutil.process_iter():
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(needle in cmdline for needle in needles):
            found.add(proc.pid)
    return found


def encode(array, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict:
    """Real photos from pip packages, as arrays: a cat and a cup of espresso."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}
