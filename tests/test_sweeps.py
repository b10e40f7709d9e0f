"""Hydra multirun: a grid of two jobs in two folders, an Optuna sweep of two trials that
optimizes the metric train.py returns, the tag requirement of sweeps; and the sweep faults of
the reliability suite: a failing job does not stop the others, and DDP jobs write one folder and
one W&B run each."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import TINY, check_ok, run_entry

# sweeps need no test pass, grid or checkpoint of their own to check what they check
QUICK = [*TINY, "test=false", "callbacks.sample_grid=null", "callbacks.lr_monitor=null"]


def test_multirun_two_jobs_two_folders(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        *QUICK,
        "model.optimizer.lr=1e-4,3e-4",
        "tags=[lr_sweep]",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    for job, lr in (("0", 1e-4), ("1", 3e-4)):
        config = yaml.safe_load((sweep_dir / job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["optimizer"]["lr"] == lr
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()


def test_multirun_without_tags_is_an_error(tmp_path: Path) -> None:
    result = run_entry(
        "train.py",
        "-m",
        "model.optimizer.lr=1e-4,3e-4",
        "tags=[]",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "tags is empty: a multirun needs tags" in result.stderr + result.stdout


def test_optuna_sweep_two_trials(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    result = run_entry(
        "train.py",
        "-m",
        "hparams_search=ddpm_optuna",
        *QUICK,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    # val/caption_exact, measured after the trial's validation and returned by train.py's main
    assert 0.0 <= float(results["best_value"]) <= 1.0
    assert "val/caption_exact" in result.stdout + result.stderr
    # data.batch_size is searched too, but fixed here by the command line (TINY)
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.lr_scheduler.warmup_steps",
        "model.ema_decay",
    }
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]


def test_a_failing_job_does_not_stop_the_multirun(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        *QUICK,
        "trainer.max_steps=abc,4",  # job 0 fails on its config, job 1 trains
        "tags=[fault]",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0  # the multirun says a job failed ...
    out = result.stdout + result.stderr
    assert "trainer.max_steps='abc': expected int" in out
    assert re.search(r"Error executing job with overrides: \[[^\]]*'trainer\.max_steps=abc'", out)
    assert (sweep_dir / "1" / "checkpoints" / "last.ckpt").is_file()  # ... after running the rest


def test_ddp_jobs_of_a_multirun_write_one_folder_and_one_wandb_run_each(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        *QUICK,
        "trainer=ddp_cpu",
        "logger=wandb",
        "model.optimizer.lr=1e-4,3e-4",
        "tags=[ddp_sweep]",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    folders = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert folders == ["0", "1"], folders
    ids = set()
    for job in folders:
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file()  # rank 1 wrote here
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        ids.add((sweep_dir / job / "wandb_id.txt").read_text().strip())
    assert len(ids) == 2
    assert not (tmp_path / "logs").exists()  # no stray per-rank run folder


def test_submitit_local_multirun_runs_two_jobs(tmp_path: Path) -> None:
    """`hydra/launcher=submitit_local`: Hydra's submitit launcher runs each job of the sweep as
    a submitit process (the way SLURM jobs run), each in its own job folder."""
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        *QUICK,
        "seed=1,2",
        "tags=[submitit]",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
        timeout=400,
    )
    check_ok(result)
    assert (sweep_dir / ".submitit").is_dir()  # submitit's own pickles and logs
    for job, seed in (("0", 1), ("1", 2)):
        config = yaml.safe_load((sweep_dir / job / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == seed
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()


def test_submitit_slurm_launcher_follows_the_trainer(tmp_path: Path) -> None:
    """`hydra/launcher=slurm`: the SLURM launcher's nodes and tasks come from trainer.num_nodes / trainer.devices, and
    the preemption callback listens to the signal submitit sends before the time limit."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import genlab  # noqa: F401  (registers the run folder's resolvers)
    from conftest import CONF

    GlobalHydra.instance().clear()
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        f"paths.output_dir={tmp_path}",
        f"paths.work_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["signal_delay_s"] > 0
    assert "SIGUSR1" in cfg.callbacks.preemption.signals
