"""The house rules of the layout: the import rule between utils' rooms (utils/__init__.py), no imports of the
scripts, and modules of readable size."""
import ast
from pathlib import Path

import pytest

from utils import ALLOWED_IMPORTS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"run_0", "t_models", "cal_from_mask", "plot_curves", "onnx_detect", "average_weights"}
MAX_LINES = 320           # "about 300"


def imported_modules(source: str) -> set[str]:
    """Every module an import statement of ``source`` names, at any depth (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def rule_breaks(room: str, source: str) -> list[str]:
    """The imports of a module in ``room`` ("io", ..., or "model") that the import rule forbids."""
    allowed = ALLOWED_IMPORTS.get(room, set()) | {room}
    breaks = []
    for name in sorted(imported_modules(source)):
        top, _, rest = name.partition(".")
        if top in SCRIPTS:
            breaks.append(f"{name} (a script)")
        elif room == "model" and top == "utils":
            breaks.append(f"{name} (the model imports nothing of utils)")
        elif top == "model" and room != "model" and "model" not in allowed:
            breaks.append(f"{name} (room {room} may not use the model)")
        elif top == "utils" and rest:
            target = rest.split(".")[0]
            if target in ALLOWED_IMPORTS and target not in allowed:
                breaks.append(f"{name} (room {room} may use {sorted(allowed - {room}) or 'nothing else'})")
    return breaks


def room_modules():
    for path in sorted((ROOT / "utils").rglob("*.py")):
        parts = path.relative_to(ROOT / "utils").parts
        if len(parts) > 1:
            yield parts[0], path
    for path in sorted((ROOT / "model").rglob("*.py")):
        yield "model", path


def test_every_module_keeps_the_import_rule():
    breaks = [f"{path.relative_to(ROOT)}: {b}" for room, path in room_modules()
              for b in rule_breaks(room, path.read_text())]
    assert not breaks, "imports against the rule in utils/__init__.py:\n" + "\n".join(breaks)


@pytest.mark.parametrize("room, source", [
    ("io", "from utils.data.splits import DatasetError"),
    ("data", "def f():\n    from utils.train.config import TrainConfig\n"),
    ("score", "import utils.export.predict"),
    ("export", "from utils.train import engine"),
    ("io", "from model import DCONet"),
    ("model", "from utils.io.images import read_gray"),
    ("train", "import run_0"),
])
def test_the_rule_check_catches_a_lower_room_importing_a_higher_one(room, source):
    assert rule_breaks(room, source)


@pytest.mark.parametrize("room, source", [
    ("train", "from utils.data import build_datasets\nfrom utils.score.metrics import Evaluator\nfrom model import DCONet"),
    ("export", "from utils.score.components import components\nfrom utils.io.video import FrameSource"),
    ("data", "from utils.io.images import read_gray"),
])
def test_the_rule_check_allows_what_the_rule_allows(room, source):
    assert not rule_breaks(room, source)


def test_every_room_lists_its_modules_and_nothing_sits_loose_in_utils():
    loose = [p.name for p in (ROOT / "utils").glob("*.py") if p.name not in {"__init__.py", "cli.py"}]
    assert not loose, f"modules outside the rooms: {loose}"
    rooms = {p.name for p in (ROOT / "utils").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ALLOWED_IMPORTS)
    for room in rooms:
        assert (ROOT / "utils" / room / "__init__.py").is_file(), f"utils/{room} has no __init__.py"


def test_re_exported_names_resolve():
    import importlib
    for room in ALLOWED_IMPORTS:
        package = importlib.import_module(f"utils.{room}")
        for name in dir(package):
            assert getattr(package, name) is not None


def test_modules_stay_readable_in_size():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted([*(ROOT / "utils").rglob("*.py"),
                                                                 *(ROOT / "model").rglob("*.py")])
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
