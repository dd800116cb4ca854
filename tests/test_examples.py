"""The examples run (on a short budget) and show what they claim."""
import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibrated_posttraining_example(tmp_path, capsys):
    out = tmp_path / "cal.lsc"
    got = _load("calibrated_posttraining").main(["--epochs", "10", "--out", str(out)])
    (one_bytes, one_acc), (cal_bytes, cal_acc), (fb_bytes, fb_acc) = got.values()
    assert out.stat().st_size == cal_bytes  # --out keeps the calibrated file
    assert cal_bytes < 0.9 * one_bytes  # calibrated bounds: a smaller file ...
    assert cal_acc >= one_acc - 0.02    # ... at about the same test accuracy
    assert fb_bytes < 0.9 * cal_bytes and fb_acc >= one_acc - 0.03  # error feedback: smaller again
    assert "bounds: conv1.weight" in capsys.readouterr().out
