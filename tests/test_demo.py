"""The demo command end to end on the bundled data, with a tiny model and two training steps."""

from __future__ import annotations

import json

from dinorankclip.cli.main import main
from dinorankclip.eval.bundled import ZEROSHOT_SETS


def test_demo_writes_results_and_table(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--minutes", "1", "--out", str(out), *tiny_overrides])
    assert code == 0

    results = json.loads((out / "demo_results.json").read_text())
    retrieval = results["retrieval"]
    assert retrieval["num_images"] == 125
    assert retrieval["num_texts"] == 625
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10"):
            assert 0.0 <= retrieval[direction][k] <= 1.0
            assert 0.0 < retrieval["chance"][direction][k] < 0.1
    assert set(results["zeroshot"]) == set(ZEROSHOT_SETS)
    assert results["zeroshot"]["cifar10"]["chance_top1"] == 0.1
    assert results["train"]["steps"] == 2
    assert results["config"]["loss"]["order"] == 3
    assert (out / "run" / "model.safetensors").is_file()

    printed = capsys.readouterr().out
    assert "retrieval image->text  R@5" in printed
    assert "zero-shot cub200" in printed
    assert "mean retrieval R@5" in printed
