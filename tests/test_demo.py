"""The end-to-end demo: corpus -> `python -m albef.pretrain` -> retrieval well above chance."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from albef.demo import main, recall_ratio

pytestmark = pytest.mark.slow

PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_itc_loss.py"


def test_recall_ratio():
    result = {"txt_r1": 6.0, "img_r1": 2.0, "chance_txt_r1": 1.0, "chance_img_r1": 1.0}
    assert recall_ratio(result) == pytest.approx(4.0)


def test_plot_itc_loss(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": s, "itc_ce": 5.0 - s / 10, "itc_kl": 3.0 - s / 10, "itc_entropy": 2.0} for s in range(1, 6)]
    records.insert(2, {"step": 3, "event": "nonfinite_skip"})  # events carry no ITC terms
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "plot" / "itc.png"
    done = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(log), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step 5" in done.stdout and "itc_ce 4.5000" in done.stdout
    # a log without ITC terms is a one-line error naming the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    done = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(bad), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and "bad.jsonl" in done.stderr


def test_quick_demo_beats_chance(tmp_path, capsys):
    code = main(["--quick", "--out", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "x chance" in out and (tmp_path / "run" / "itc_ce_kl.png").is_file()

    # albef.load on the demo run: each test caption's own image comes first more often than chance
    import albef
    import torch
    from PIL import Image

    model, _ = albef.load(tmp_path / "run")
    test = json.loads((tmp_path / "data" / "test.json").read_text())
    images = [Image.open(tmp_path / "data" / entry["image"]) for entry in test]
    captions = [entry["caption"][0] for entry in test]
    own = torch.arange(len(test))
    itc_top1 = (model.similarity(images, captions).argmax(dim=0) == own).float().mean().item()
    few = 30  # ITM scores every pair: a subset
    itm_top1 = (model.itm_score(images[:few], captions[:few]).argmax(dim=0) == own[:few]).float().mean().item()
    print(f"albef.load on the demo run: caption -> own image first: ITC {itc_top1:.2f} (chance {1 / len(test):.2f}), "
          f"ITM {itm_top1:.2f} (chance {1 / few:.2f})")
    assert itc_top1 > 2 / len(test) and itm_top1 > 1 / few
