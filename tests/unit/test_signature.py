"""The run signature: what decides a result, and how two of them differ."""

from __future__ import annotations

from capsnet.run.signature import SCHEDULE_LENGTH_KEYS, configuration, differences, run_signature

RESOLVED = {
    "seed": 0,
    "recon": True,
    "routing": {"iters": 3},
    "experiment_name": "table1",
    "figures": True,
    "paths": {"data_dir": "/data", "output_dir": "/runs/x"},
    "logger": {"_target_": "CSVLogger"},
    "data": {"name": "mnist", "batch_size": 128, "eval_batch_size": 500},
    "trainer": {"precision": "32-true", "devices": 8, "accelerator": "gpu", "max_epochs": 15},
    "optim": {"lr": 0.001},
    "perf": {"compile": False, "matmul_precision": "high"},
}


def test_signature_keeps_what_decides_the_result_and_adds_the_world_size() -> None:
    signature = run_signature(RESOLVED, world_size=8)
    assert signature == {
        "data.batch_size": 128,
        "data.name": "mnist",
        "optim.lr": 0.001,
        "perf.matmul_precision": "high",
        "recon": True,
        "routing.iters": 3,
        "seed": 0,
        "trainer.max_epochs": 15,
        "trainer.precision": "32-true",
        "world_size": 8,
    }
    assert "seed" not in configuration(signature) and "world_size" not in configuration(signature)


def test_differences_name_each_key_and_may_ignore_the_schedule_length() -> None:
    before = run_signature(RESOLVED, world_size=1)
    longer = {**RESOLVED, "trainer": {**RESOLVED["trainer"], "max_epochs": 30, "precision": "bf16-mixed"}}
    after = run_signature(longer, world_size=2)
    assert differences(before, after) == [
        "trainer.max_epochs: 15 -> 30",
        "trainer.precision: '32-true' -> 'bf16-mixed'",
        "world_size: 1 -> 2",
    ]
    assert differences(before, after, ignore=SCHEDULE_LENGTH_KEYS) == [
        "trainer.precision: '32-true' -> 'bf16-mixed'",
        "world_size: 1 -> 2",
    ]
    assert differences(before, before) == []


def test_run_names_are_one_short_dir_level_and_a_pure_function_of_the_command() -> None:
    from capsnet.run.resolvers import MAX_RUN_NAME, run_name

    assert run_name("") == "defaults"
    assert run_name("ckpt_path=outputs/a/best.ckpt,seed=1") == "ckpt_path=outputs_a_best.ckpt,seed=1"
    assert run_name("ckpt_path='outputs/x=1/best.ckpt'") == "ckpt_path=outputs_x=1_best.ckpt"
    long_a, long_b = ",".join(f"optim.lr={i / 7}" for i in range(20)), ",".join(f"optim.lr={i / 9}" for i in range(20))
    assert len(run_name(long_a)) <= MAX_RUN_NAME and run_name(long_a) == run_name(long_a)
    assert run_name(long_a) != run_name(long_b) and run_name(long_a).startswith(long_a[:120])
