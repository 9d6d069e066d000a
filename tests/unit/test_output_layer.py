"""The output layer (leaderboard, report, html, plots) reads records only: it runs where torch cannot be imported."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "sae_lens", "lm_eval")

# A `None` entry in sys.modules makes `import torch` raise ImportError, as on a machine without torch.
SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
from saebench.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
print("heavy modules loaded:", loaded)
sys.exit(code)
"""


def test_leaderboard_builds_from_records_with_torch_unimportable(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(ROOT / "leaderboards" / "records", runs)  # the committed records, as a user would have them
    out = tmp_path / "lb"
    done = subprocess.run([sys.executable, "-c", SCRIPT, "leaderboard", "--runs", str(runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "heavy modules loaded: []" in done.stdout
    assert "ce_loss_recovered" in (out / "ce_kl.md").read_text()
    # trade-off plots come from what the records say of their task, not from the installed task plugin
    assert list(out.glob("ce_kl-*-tradeoff-*.png"))
    assert (out / "index.html").exists() and (out / "ce_kl.html").exists()


def test_saebench_is_importable_without_torch():
    """`import saebench` and its CLI parser need no torch (the lazy evaluate/RunConfig are not touched)."""
    code = f"import sys\nfor n in {BLOCKED!r}: sys.modules[n] = None\nimport saebench\nfrom saebench.cli import build_parser\n" \
           "build_parser().parse_args(['leaderboard'])\nprint(saebench.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
