"""bench/gpu.py's --dry mode: every stage of the prepared GPU run executes on the CPU at tiny sizes, so a
GPU machine's one run does not die of a bug that a CPU could have caught."""

import json

import torch

from bench import gpu


def test_dry_run_executes_every_stage_and_writes_one_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu.main(["--dry", "--out", str(tmp_path / "gpu.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    stages = json.loads((tmp_path / "gpu.json").read_text())["stages"]
    assert list(stages) == list(gpu.STAGES)
    failed = {name: r.get("error") for name, r in stages.items() if r["status"] != "ok"}
    assert not failed, failed  # on the CPU every stage runs (the CUDA-only parts are left out inside them)
    assert stages["pipeline"]["ratio_ours_over_diffusers"]["euler_joint"] > 0
    assert stages["dit"]["relative_max_diff"] < 1e-5  # fp32 on the CPU: ours equals diffusers' DiT
    assert stages["vae"]["64"]["relative_max_diff"] < 1e-4
    assert (stages["compile"]["graphs"], stages["compile"]["graph_breaks"]) == (1, 0)
    assert stages["lora"]["ours_restored_exactly"] and stages["lora"]["lora_change_rel"] > 0
    assert all(p == "ok" for p in stages["mmgp_p4"]["previews"])
    table = capsys.readouterr().out
    assert all(name in table for name in gpu.STAGES) and "results:" in table
