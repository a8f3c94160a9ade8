"""The preempted exit code is defined once, in lmforge_common, and every user takes it from there.

launch/ imports nothing of pretrain/, so the trainer, the sbatch script and both launchers can only
agree through that one definition; a second definition (or a module using the name without importing
it, as the trainer once did) fails here.
"""
import ast
from pathlib import Path

from launch.sbatch_scripts import render_train_script
from launch.slurm import SlurmOptions
from lmforge_common import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
NAME = "EXIT_PREEMPTED"


def _modules():
    yield ROOT / "lmforge_common.py"
    for package in ("data_prep", "pretrain", "launch", "lmforge"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_exit_preempted_is_defined_once_and_imported_from_lmforge_common_everywhere_it_is_used():
    definitions, users, importers = [], set(), set()
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                definitions += [path.name for t in targets if isinstance(t, ast.Name) and t.id == NAME]
            elif isinstance(node, ast.ImportFrom) and any(a.name == NAME for a in node.names):
                assert node.module == "lmforge_common", f"{path}: imports {NAME} from {node.module}"
                importers.add(path)
            elif isinstance(node, ast.Name) and node.id == NAME:
                users.add(path)
    assert definitions == ["lmforge_common.py"] and EXIT_PREEMPTED == 75
    assert users - {ROOT / "lmforge_common.py"} <= importers, "uses the name without importing it"
    expected = {ROOT / p for p in ("pretrain/preemption.py", "launch/local.py", "launch/mpi.py",
                                   "launch/sbatch_scripts.py", "lmforge/commands.py")}
    assert expected <= users, sorted(map(str, expected - users))


def test_the_sbatch_script_treats_the_code_as_saved_and_requeues():
    script = render_train_script(SlurmOptions(nodes=2, preemption=True), ["python", "-m", "lmforge", "train", "c.yaml"],
                                 "/runs/r", "/work")
    assert f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then touch "$PREEMPTED_MARKER"; rc=0; fi' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
