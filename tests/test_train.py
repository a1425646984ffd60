"""The training engine on the toy task: learning, checkpoints, exact resume, NaN stop, multi-process."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shapeflow import checkpoint as ckpt_lib
from shapeflow.train.ema import EMA
from shapeflow.train.experiment import TrainConfig, load_config
from shapeflow.train.loop import GlobalBatchSampler, NonFiniteLossError, lr_at, run
from shapeflow.train.task_toy import ToyMLP, ToyModelConfig
from shapeflow.train.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
TOY_YAML = REPO / "configs" / "toy.yaml"
# float32 everywhere: the engine tests compare runs bit for bit or to 1e-6 (with precision auto an AMX
# CPU would train in bf16; that path has its own test)
QUIET = ["train.log_every=4", "train.num_workers=0", "train.precision=fp32"]


def toy_cfg(out: Path, *overrides: str):
    cfg = load_config(TOY_YAML, [*QUIET, *overrides])
    return dataclasses.replace(cfg, out_dir=str(out))


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name, s in state["optimizer"]["state"].items() for k, v in s.items()
            if isinstance(v, torch.Tensor)}


# ---- pieces ------------------------------------------------------------------------------------


def test_lr_schedule():
    over = ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]
    tc = load_config(TOY_YAML, over).train
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)  # linear warm-up
    assert lr_at(10, tc) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(55, tc) == pytest.approx(0.55)  # half way: mean of lr and min_lr
    assert lr_at(100, tc) == pytest.approx(0.1) and lr_at(500, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 100))


def test_ema_math():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9, start=2, warmup=True)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(2) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)  # before start: copy
    assert torch.equal(ema.params["weight"], w0 + 1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)  # decay 0.9
    torch.testing.assert_close(ema.params["weight"], 0.9 * (w0 + 1.0) + 0.1 * (w0 + 2.0))
    state = ema.state_dict()
    assert state.keys() == model.state_dict().keys()
    other = EMA(torch.nn.Linear(2, 1))
    other.load_state_dict(state)
    assert_same_state(other.state_dict(), state)


def test_global_batches_are_split_across_ranks_and_resumable():
    n, B = 50, 8
    single = list(GlobalBatchSampler(n, B, 0, 1, 1, seed=3, start_step=0, stop_step=13))
    ranks = [list(GlobalBatchSampler(n, B, r, 2, 2, seed=3, start_step=0, stop_step=13)) for r in range(2)]
    for step, batch in enumerate(single):
        parts = ranks[0][2 * step: 2 * step + 2] + ranks[1][2 * step: 2 * step + 2]
        assert sum(parts, []) == batch  # same global batch, rank-contiguous, in order
        assert all(len(p) == 2 for p in parts)
    assert len({k % n for k in sum(single[:6], [])}) == 48  # epoch 0: 6 batches, no repeats
    assert single[6][0] // n == 1  # step 6 starts epoch 1 (tail of 2 dropped)
    assert list(GlobalBatchSampler(n, B, 0, 1, 1, seed=3, start_step=5, stop_step=13)) == single[5:]
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        GlobalBatchSampler(4, 8, 0, 1, 1, 0, 0, 1)


# ---- training ----------------------------------------------------------------------------------


def test_toy_trains_and_exports(tmp_path):
    out = tmp_path / "run"
    res = run(toy_cfg(out, "train.steps=60", "train.ckpt_every=30", "train.val_every=30"))
    recs = train_records(out)
    assert recs[0]["step"] == 4 and recs[-1]["step"] == 60
    assert recs[-1]["loss"] < 0.3 * recs[0]["loss"], (recs[0]["loss"], recs[-1]["loss"])
    for key in ("loss", "mse", "mae", "lr", "grad_norm", "samples_per_s"):
        assert math.isfinite(recs[-1][key])
    assert res["step"] == 60 and res["val/mse"] < 0.5 * recs[0]["mse"] and "val_ema/mse" in res
    # checkpoints, pointer, final export, TensorBoard
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [30, 60]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    cfg_json = json.loads((final / "config.json").read_text())
    assert cfg_json["task"] == "toy" and cfg_json["model"]["hidden"] == 16
    model = ToyMLP(ToyModelConfig(**cfg_json["model"]))
    ckpt_lib.load_weights(final, model)
    ema = load_file(str(out / "checkpoints" / "step_00000060" / "ema.safetensors"))
    raw = load_file(str(out / "checkpoints" / "step_00000060" / "model.safetensors"))
    assert_same_state(model.state_dict(), ema)  # final/ holds the EMA weights
    assert not torch.equal(ema["out.weight"], raw["out.weight"])


def test_fresh_run_refuses_existing_checkpoints_and_resume_checks_config(tmp_path):
    out = tmp_path / "run"
    run(toy_cfg(out, "train.steps=4", "train.val_every=0"))
    with pytest.raises(ValueError, match="already has checkpoints; pass --resume"):
        run(toy_cfg(out, "train.steps=4"))
    match = r"cannot resume with a different task/model/data config or optimizer \(model.hidden: 16 -> 8"
    with pytest.raises(ValueError, match=match):
        run(toy_cfg(out, "train.steps=8", "model.hidden=8"), resume=True)
    with pytest.raises(ValueError, match=r"or optimizer \(train.optimizer: 'adamw' -> 'muon'\)"):
        run(toy_cfg(out, "train.steps=8", "train.optimizer=muon"), resume=True)
    match = r"train.batch_size=32 is not divisible by world size x grad_accum = 1 x 3"
    with pytest.raises(ValueError, match=match):
        run(toy_cfg(tmp_path / "other", "train.grad_accum=3"))


class _Interrupt(Exception):
    pass


def _interrupting(monkeypatch, at_step: int) -> None:
    """Make the toy task raise when it reaches ``at_step`` (a kill after a checkpoint)."""
    toy = TASKS["toy"]

    def loss(model, batch, cfg, step, frozen):
        if step == at_step:
            raise _Interrupt
        return toy.loss(model, batch, cfg, step, frozen)

    monkeypatch.setitem(TASKS, "toy", dataclasses.replace(toy, loss=loss))


@pytest.mark.parametrize("workers,optimizer", [(0, "adamw"), (2, "adamw"), (0, "muon")])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, workers, optimizer):
    # dropout (torch RNG in forward), input jitter (RNG in __getitem__), EMA warm-up, grad accumulation,
    # and an epoch boundary (512 // 32 = 16 steps per epoch) inside the resumed half
    over = ["train.steps=24", "train.ckpt_every=12", "train.val_every=12", "model.dropout=0.2",
            "train.grad_accum=2", "train.warmup_steps=5", f"train.num_workers={workers}",
            f"train.optimizer={optimizer}"]
    run(toy_cfg(tmp_path / "a", *over))
    with monkeypatch.context() as m:
        _interrupting(m, at_step=12)
        with pytest.raises(_Interrupt):
            run(toy_cfg(tmp_path / "b", *over))
    assert ckpt_lib.latest_checkpoint(tmp_path / "b").name == "step_00000012"
    run(toy_cfg(tmp_path / "b", *over), resume=True)
    a, b = (tmp_path / d / "checkpoints" / "step_00000024" for d in "ab")
    for f in ("model.safetensors", "ema.safetensors"):
        assert_same_state(load_file(str(a / f)), load_file(str(b / f)))  # bitwise
    sa, sb = ckpt_lib.load_train_state(a), ckpt_lib.load_train_state(b)
    assert_same_state(optimizer_tensors(sa), optimizer_tensors(sb))
    assert sa["step"] == sb["step"] == 24 and sa["data"] == sb["data"] and sa["data"]["epoch"] == 1
    assert [torch.equal(x["torch"], y["torch"]) for x, y in zip(sa["rng"], sb["rng"])] == [True]
    # and the logs after the resume point are the same numbers
    la = [r["loss"] for r in train_records(tmp_path / "a") if r["step"] > 12]
    lb = [r["loss"] for r in train_records(tmp_path / "b") if r["step"] > 12]
    assert la == lb and len(la) == 3


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from shapeflow.models.vecset_vae import VecSetVAE
    from shapeflow.train.loop import CombinedOptimizer, _optimizer

    model = VecSetVAE.from_preset("tiny", encoder_layers=1, decoder_layers=1)
    opt, names = _optimizer(model, TrainConfig(optimizer="muon", lr=1e-3))
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    params = dict(model.named_parameters())
    in_muon = {n for n in names if any(params[n] is p for g in muon.param_groups for p in g["params"])}
    assert "encoder.blocks.0.attn.to_qkv.weight" in in_muon
    assert "geo_decoder.cross_attn.mlp.fc1.weight" in in_muon
    for n in ("encoder.input_proj.weight", "geo_decoder.output_proj.weight", "pre_kl.weight",
              "geo_decoder.pos_head.1.weight", "encoder.blocks.0.mlp.fc1.bias"):
        assert n in names and n not in in_muon, n
    assert sorted(names) == sorted(params) and all(params[n].ndim == 2 for n in in_muon)
    # the lr the loop sets reaches both members; the state dict numbers parameters like one optimizer
    for g in opt.param_groups:
        g["lr"] = 0.5
    assert all(g["lr"] == 0.5 for o in opt.optimizers for g in o.param_groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(names)))
    assert set(sd["state"][0]) == {"momentum_buffer"} and "exp_avg" in sd["state"][len(in_muon)]
    twin, _ = _optimizer(model, TrainConfig(optimizer="muon", lr=1e-3))
    twin.load_state_dict(sd)
    again = twin.state_dict()
    assert all(torch.equal(again["state"][i]["momentum_buffer"], sd["state"][i]["momentum_buffer"])
               for i in range(len(in_muon)))


def test_muon_on_a_torch_without_it_is_a_clear_error(monkeypatch):
    from shapeflow.train.loop import _optimizer

    model = ToyMLP(ToyModelConfig())
    monkeypatch.delattr(torch.optim, "Muon")  # torch < 2.9
    with pytest.raises(ValueError, match=r"train.optimizer=muon needs torch >= 2.9 .*train.optimizer=adamw"):
        _optimizer(model, TrainConfig(optimizer="muon"))
    opt, _ = _optimizer(model, TrainConfig(optimizer="adamw"))  # AdamW training is unaffected
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_updates_as_torch_muon(nesterov):
    from shapeflow.train.muon import BatchedMuon

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 48), (48, 16), (16, 16), (32, 16), (16, 48)]  # tall, square, wide
    ref = [torch.nn.Parameter(0.1 * torch.randn(s)) for s in shapes]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    o_ref, o_mine = torch.optim.Muon(ref, **kw), BatchedMuon(mine, **kw)
    start = [p.detach().clone() for p in ref]
    for step in range(4):
        for i, (a, b) in enumerate(zip(ref, mine)):
            g = None if (step == 1 and i == 2) else torch.randn_like(a)  # a parameter without a gradient
            a.grad, b.grad = g, None if g is None else g.clone()
        o_ref.step()
        o_mine.step()
    # both orthogonalise in bfloat16, where a batched and a single matmul may round an element
    # differently: allow a few bfloat16 ulps of the update (lr_adjusted = 0.02 * 0.2 * sqrt(48) = 0.028
    # per step)
    for a, b, s in zip(ref, mine, start):
        assert (a - s).abs().max() > 0.02
        torch.testing.assert_close(b, a, rtol=0, atol=5e-4)
    sd_ref, sd_mine = o_ref.state_dict(), o_mine.state_dict()
    assert sd_ref["param_groups"] == sd_mine["param_groups"]
    for i in sd_ref["state"]:
        assert torch.equal(sd_mine["state"][i]["momentum_buffer"], sd_ref["state"][i]["momentum_buffer"])
    # the state moves between the two classes (checkpoints written with torch's Muon resume)
    twin = BatchedMuon([torch.nn.Parameter(p.detach().clone()) for p in ref], **kw)
    twin.load_state_dict(sd_ref)
    buf = twin.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, sd_ref["state"][0]["momentum_buffer"])


def test_precision_auto_is_bf16_on_cuda_and_native_bf16_cpus(monkeypatch):
    from shapeflow.train import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx, avx512_bf16 in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b, raising=False)
        assert loop.use_bf16("auto", cpu) is (amx or avx512_bf16)
        assert loop.use_bf16("auto", cuda) is True
        assert loop.use_bf16("bf16", cpu) is True and loop.use_bf16("fp32", cpu) is False
        assert loop.use_bf16("fp32", cuda) is False


def test_bf16_autocast_on_cpu_trains(tmp_path, monkeypatch):
    from shapeflow.train import loop

    seen = []
    real = loop.torch.autocast

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop.torch, "autocast", spy)
    out = tmp_path / "run"
    run(toy_cfg(out, "train.steps=40", "train.ckpt_every=0", "train.val_every=0", "train.precision=bf16"))
    assert seen and all(a == ("cpu",) and k == {"dtype": torch.bfloat16} for a, k in seen)
    recs = train_records(out)
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"], (recs[0]["loss"], recs[-1]["loss"])
    w = ckpt_lib.read_weights(out, "model")
    assert all(v.dtype == torch.float32 for v in w.values())  # fp32 master weights


def test_grad_accum_and_checkpointing_do_not_change_the_update(tmp_path):
    base = ["train.steps=10", "train.val_every=0", "train.ckpt_every=0", "model.preset=small"]
    run(toy_cfg(tmp_path / "a", *base))
    run(toy_cfg(tmp_path / "b", *base, "train.grad_accum=4", "train.grad_checkpointing=true"))
    wa = ckpt_lib.read_weights(tmp_path / "a", "model")
    wb = ckpt_lib.read_weights(tmp_path / "b", "model")
    assert_same_state(wa, wb, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    toy = TASKS["toy"]

    def loss(model, batch, cfg, step, frozen):
        value, logs = toy.loss(model, batch, cfg, step, frozen)
        if step >= 7:
            value = value * float("nan")
            logs = {**logs, "mse": value.detach()}
        return value, logs

    monkeypatch.setitem(TASKS, "toy", dataclasses.replace(toy, loss=loss))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        run(toy_cfg(out, "train.steps=20", "train.ckpt_every=5", "train.val_every=0"))
    msg = str(e.value)
    assert msg.startswith("step 7: non-finite loss (loss=nan, mae=") and "mse=nan" in msg
    assert "step_00000005" in msg and "\n" not in msg
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [5]
    assert ckpt_lib.latest_checkpoint(out).name == "step_00000005"
    assert not (out / "final").exists()
    assert all(torch.isfinite(t).all() for t in ckpt_lib.read_weights(out, "model").values())

    # through the command: exit code 3, one log line
    from shapeflow.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train", str(TOY_YAML), *QUIET, "train.steps=9", "train.val_every=0",
                              "--out", str(tmp_path / "cli")])
    assert args.func(args) == train_cmd.EXIT_NON_FINITE


# ---- checkpoints -------------------------------------------------------------------------------


def _fake_states(seed: int):
    torch.manual_seed(seed)
    model = ToyMLP(ToyModelConfig())
    return model, model.state_dict()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    model, sd = _fake_states(0)
    common = dict(config={"task": "toy"}, ema_state=sd, train_state={"step": 1}, keep_last=3)
    ckpt_lib.save_checkpoint(out, 1, model_state=sd, **common)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # the weights are written, then saving state.pt fails half way through
    monkeypatch.setattr(ckpt_lib.torch, "save", crash)
    _, sd2 = _fake_states(1)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_lib.save_checkpoint(out, 2, model_state=sd2, **common)
    monkeypatch.undo()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no partial step_2, no tmp
    assert ckpt_lib.latest_checkpoint(out).name == "step_00000001"
    # a writer killed outright leaves only a .tmp-* folder, which is ignored and cleaned up
    (root / ".tmp-step_00000002-999").mkdir()
    (root / ".tmp-step_00000002-999" / "model.safetensors").write_bytes(b"partial")
    assert ckpt_lib.latest_checkpoint(out).name == "step_00000001"
    ckpt_lib.clean_stale(out)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    # keep_last prunes the oldest
    for step in (2, 3, 4):
        ckpt_lib.save_checkpoint(out, step, model_state=sd, **{**common, "keep_last": 2})
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [3, 4]
    loaded = ToyMLP(ToyModelConfig())
    ckpt_lib.load_weights(out, loaded, "model")
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_load_weights_is_strict_with_clear_errors(tmp_path):
    _, sd = _fake_states(0)
    ckpt = ckpt_lib.save_checkpoint(tmp_path, 1, config={}, model_state=sd, ema_state=None, train_state={})
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.load_weights(ckpt, ToyMLP(ToyModelConfig(hidden=8)), "model")
    msg = str(e.value)
    assert msg.startswith(f"{ckpt / 'model.safetensors'}: weights do not match the model;")
    assert "shape mismatch: inp.weight (32, 8) vs model (8, 8)" in msg
    match = r"weights do not match the model; missing keys: blocks.2.0.bias, blocks.2.0.weight, "
    with pytest.raises(ckpt_lib.CheckpointError, match=match):
        ckpt_lib.load_weights(ckpt, ToyMLP(ToyModelConfig(depth=3)), "model")
    match = r"match the model; unexpected keys: blocks.1.0.bias, "
    with pytest.raises(ckpt_lib.CheckpointError, match=match):
        ckpt_lib.load_weights(ckpt, ToyMLP(ToyModelConfig(depth=1)), "model")
    match = r"ema.safetensors: not found \(trained with train.ema=false\?\)"
    with pytest.raises(ckpt_lib.CheckpointError, match=match):
        ckpt_lib.load_weights(ckpt, ToyMLP(ToyModelConfig()), "ema")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt_lib.load_weights(tmp_path / "nope", ToyMLP(ToyModelConfig()))


# ---- multi-process (torchrun, gloo on CPU) -----------------------------------------------------

_SCRIPT = """
import dataclasses, sys
from shapeflow.train.experiment import load_config
from shapeflow.train.loop import run
cfg = load_config(sys.argv[1], sys.argv[4:])
run(dataclasses.replace(cfg, out_dir=sys.argv[2]), resume=sys.argv[3] == "resume")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, out: Path, overrides: list[str], resume: bool = False) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(script), str(TOY_YAML), str(out),
           "resume" if resume else "fresh", *QUIET, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


MP = ["train.steps=16", "train.ckpt_every=8", "train.val_every=8", "train.grad_clip=0.5"]


@pytest.mark.slow
def test_torchrun_ddp_two_processes_match_single(tmp_path):
    _torchrun(tmp_path, tmp_path / "ddp", MP)
    run(toy_cfg(tmp_path / "single", *MP))
    for which in ("model", "ema"):
        assert_same_state(ckpt_lib.read_weights(tmp_path / "ddp", which),
                          ckpt_lib.read_weights(tmp_path / "single", which), atol=1e-6)
    sa, sb = (ckpt_lib.load_train_state(tmp_path / d) for d in ("ddp", "single"))
    assert_same_state(optimizer_tensors(sa), optimizer_tensors(sb), atol=1e-6)
    assert len(sa["rng"]) == 2 and sa["world_size"] == 2
    # same metrics (losses averaged over ranks = over the global batch)
    la = [r["loss"] for r in train_records(tmp_path / "ddp")]
    lb = [r["loss"] for r in train_records(tmp_path / "single")]
    assert la == pytest.approx(lb, abs=1e-6)


@pytest.mark.slow
def test_torchrun_fsdp_matches_single_and_resumes_a_single_process_checkpoint(tmp_path, monkeypatch):
    fsdp = [*MP, "train.strategy=fsdp"]
    _torchrun(tmp_path, tmp_path / "fsdp", fsdp)
    run(toy_cfg(tmp_path / "single", *MP))
    for which in ("model", "ema"):
        assert_same_state(ckpt_lib.read_weights(tmp_path / "fsdp", which),
                          ckpt_lib.read_weights(tmp_path / "single", which), atol=1e-6)
    assert_same_state(optimizer_tensors(ckpt_lib.load_train_state(tmp_path / "fsdp")),
                      optimizer_tensors(ckpt_lib.load_train_state(tmp_path / "single")), atol=1e-6)
    # a single-process checkpoint at step 8, resumed by 2 FSDP ranks, ends where the single run ends
    with monkeypatch.context() as m:
        _interrupting(m, at_step=8)
        with pytest.raises(_Interrupt):
            run(toy_cfg(tmp_path / "mixed", *MP))
    _torchrun(tmp_path, tmp_path / "mixed", fsdp, resume=True)
    for which in ("model", "ema"):
        assert_same_state(ckpt_lib.read_weights(tmp_path / "mixed", which),
                          ckpt_lib.read_weights(tmp_path / "single", which), atol=1e-6)
