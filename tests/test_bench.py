"""The benchmark runs all three loops and reports consistent figures (its speed is not asserted here)."""
from stages.bench import main


def test_bench_measures_project_reference_and_ceiling(capsys):
    result = main(["--steps", "1", "--warmup", "1", "--rounds", "1", "--batch-size", "16", "--blocks", "1", "1",
                   "--widths", "8", "16", "--workers", "1", "--precision", "fp32"])
    for mode in ["project", "reference", "ceiling"]:
        assert result[f"{mode}_images_per_s"] > 0
    ratio = result["project_images_per_s"] / result["reference_images_per_s"]
    assert abs(result["project_vs_reference"] - ratio) < 0.01 * ratio
    assert result["precision"] == "fp32" and result["torch"]
    assert '"project_vs_ceiling"' in capsys.readouterr().out
