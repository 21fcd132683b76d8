import io
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def encode(array, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict:
    """Real photos from pip packages, as arrays: a cat and a cup of espresso."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}
