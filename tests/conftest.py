import os
import pickle
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import make_sprites  # noqa: E402


@pytest.fixture(scope="session")
def sheets():
    """The folder of the LPC sprite sheets; where there is none, the tests that need it skip and say why."""
    try:
        return make_sprites.find_sheets()
    except FileNotFoundError as e:
        pytest.skip(f"needs the Sprites sheets (set SPRITES_SHEETS=DIR): {e}")


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as it was after."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(sheets, tmp_path_factory):
    """A data.pkl in our format from 6 real train and 2 real test characters (54 / 18 videos)."""
    train, test = make_sprites.split_characters()
    data = make_sprites.build(sheets, train[:6], test[:2])
    path = tmp_path_factory.mktemp("data") / "data.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)
