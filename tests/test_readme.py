"""The README's example runs as written and trains; the public namespace is what it says."""

import pathlib
import re

import jdeq

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_trains(capsys):
    example = _python_blocks()[0]
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    out = capsys.readouterr().out
    match = re.search(r"loss ([0-9.]+), forward iterations (\d+)", out)
    assert match, out
    assert float(match.group(1)) < 0.05
    assert 1 <= int(match.group(2)) <= 50
    assert bool(scope["stats"].converged.all())


def test_readme_example_is_short():
    lines = [l for l in _python_blocks()[0].splitlines() if l.strip()]
    assert len(lines) <= 30


def test_public_namespace():
    for name in jdeq.__all__:
        assert hasattr(jdeq, name), name
    for name in ["fixed_point", "Solution", "SolverStats", "FixedPointIteration", "Anderson",
                 "Broyden", "JaxoptSolver", "Implicit", "Phantom", "JacobianFree", "Unrolled"]:
        assert name in jdeq.__all__, name
    assert callable(jdeq.nnx.DEQ) and callable(jdeq.linen.DEQ)
    assert callable(jdeq.nnx.Unrolled) and callable(jdeq.linen.Unrolled)
