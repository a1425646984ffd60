"""Hunyuan3D DiTs: released folders load strictly and reproduce the reference forward; sampling follows the
reference step rule; export back to the released layout; image preprocessing; image-to-3D from tiny releases.

The references below are written from ``shared/reference/vecset.md`` section 2 on the *released* key names
(not from any shapeflow module), tiny random weights saved as the release does (``config.yaml`` +
``model.fp16.ckpt``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from shapeflow.models import load_dit, load_vae, model_kind
from shapeflow.models.conditioning import preprocess_image_hunyuan, separate_background
from shapeflow.models.hunyuan_dit import Hunyuan20DiT, Hunyuan21DiT
from shapeflow.models.pretrained.hunyuan_dit import export_release, read_group, release_conditioner
from shapeflow.sampling import sample

W, H, CIN, CTX, L = 32, 4, 8, 24, 17  # width, heads, latent channels, condition width, condition tokens


def _rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def hy21_state(depth=5, moe_layers=2, experts=4, qkv_bias=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    d = W // H

    def lin(name, o, i, bias=True):
        sd[f"{name}.weight"] = _rand(g, o, i, scale=1 / math.sqrt(i))
        if bias:
            sd[f"{name}.bias"] = _rand(g, o, scale=0.05)

    def norm(name, n, bias=True):
        sd[f"{name}.weight"] = 1 + _rand(g, n, scale=0.1)
        if bias:
            sd[f"{name}.bias"] = _rand(g, n, scale=0.05)

    lin("x_embedder", W, CIN)
    lin("t_embedder.mlp.0", 4 * W, W)
    lin("t_embedder.mlp.2", W, 4 * W)
    for i in range(depth):
        p = f"blocks.{i}"
        norm(f"{p}.norm1", W), norm(f"{p}.norm2", W), norm(f"{p}.norm3", W)
        for a, kdim in (("attn1", W), ("attn2", CTX)):
            lin(f"{p}.{a}.to_q", W, W, qkv_bias)
            lin(f"{p}.{a}.to_k", W, kdim, qkv_bias)
            lin(f"{p}.{a}.to_v", W, kdim, qkv_bias)
            norm(f"{p}.{a}.q_norm", d, bias=False), norm(f"{p}.{a}.k_norm", d, bias=False)
            lin(f"{p}.{a}.out_proj", W, W)
        if i > depth // 2:
            norm(f"{p}.skip_norm", W)
            lin(f"{p}.skip_linear", W, 2 * W)
        if depth - i <= moe_layers:
            sd[f"{p}.moe.gate.weight"] = _rand(g, experts, W, scale=1.0)
            for e in [f"experts.{j}" for j in range(experts)] + ["shared_experts"]:
                lin(f"{p}.moe.{e}.net.0.proj", 4 * W, W)
                lin(f"{p}.moe.{e}.net.2", W, 4 * W)
        else:
            lin(f"{p}.mlp.fc1", 4 * W, W)
            lin(f"{p}.mlp.fc2", W, 4 * W)
    norm("final_layer.norm_final", W)
    lin("final_layer.linear", CIN, W)
    return sd


class Ref21:
    """HunYuanDiTPlain.forward on released keys (vecset.md 2.2 / 2.2.1)."""

    def __init__(self, sd, depth=5, top_k=2):
        self.sd, self.depth, self.top_k = sd, depth, top_k

    def lin(self, n, x):
        return F.linear(x, self.sd[f"{n}.weight"], self.sd.get(f"{n}.bias"))

    def ln(self, n, x):
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{n}.weight"], self.sd[f"{n}.bias"], 1e-6)

    def rms(self, n, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.sd[f"{n}.weight"]

    def attn(self, p, x, ctx=None):
        b, n, _ = x.shape
        d = W // H
        src = x if ctx is None else ctx
        q, k, v = self.lin(f"{p}.to_q", x), self.lin(f"{p}.to_k", src), self.lin(f"{p}.to_v", src)
        if ctx is None:  # head h takes its 3d-slice of cat(q, k, v)
            q, k, v = torch.cat([q, k, v], -1).view(b, n, H, 3 * d).split(d, -1)
        else:  # head h takes its 2d-slice of cat(k, v)
            q = q.view(b, n, H, d)
            k, v = torch.cat([k, v], -1).view(b, src.shape[1], H, 2 * d).split(d, -1)
        q, k = self.rms(f"{p}.q_norm", q), self.rms(f"{p}.k_norm", k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        return self.lin(f"{p}.out_proj", (w @ v).transpose(1, 2).reshape(b, n, W))

    def ff(self, p, x):
        return self.lin(f"{p}.net.2", F.gelu(self.lin(f"{p}.net.0.proj", x)))

    def moe(self, p, x):
        probs = torch.softmax(F.linear(x, self.sd[f"{p}.gate.weight"]), -1)
        top, idx = probs.topk(self.top_k, -1)  # not renormalised
        out = torch.zeros_like(x)
        for e in range(probs.shape[-1]):
            wgt = (top * (idx == e)).sum(-1, keepdim=True)
            out = out + wgt * self.ff(f"{p}.experts.{e}", x)
        return out + self.ff(f"{p}.shared_experts", x)

    def __call__(self, x, t, ctx):
        half = W // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
        arg = t[:, None] * freqs[None]  # t as is, no x1000
        temb = torch.cat([arg.sin(), arg.cos()], -1)  # [sin, cos]
        temb = self.lin("t_embedder.mlp.2", F.gelu(self.lin("t_embedder.mlp.0", temb)))
        h = torch.cat([temb[:, None], self.lin("x_embedder", x)], 1)
        skips = []
        for i in range(self.depth):
            p = f"blocks.{i}"
            if i > self.depth // 2:
                h = self.ln(f"{p}.skip_norm", self.lin(f"{p}.skip_linear", torch.cat([skips.pop(), h], -1)))
            h = h + self.attn(f"{p}.attn1", self.ln(f"{p}.norm1", h))
            h = h + self.attn(f"{p}.attn2", self.ln(f"{p}.norm2", h), ctx)
            y = self.ln(f"{p}.norm3", h)
            h = h + (self.moe(f"{p}.moe", y) if f"{p}.moe.gate.weight" in self.sd else
                     self.lin(f"{p}.mlp.fc2", F.gelu(self.lin(f"{p}.mlp.fc1", y))))
            if i < self.depth // 2:
                skips.append(h)
        h = self.ln("final_layer.norm_final", h)[:, 1:]
        return self.lin("final_layer.linear", h)


def hy20_state(depth=2, single=2, guidance=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    d = W // H

    def lin(name, o, i):
        sd[f"{name}.weight"] = _rand(g, o, i, scale=1 / math.sqrt(i))
        sd[f"{name}.bias"] = _rand(g, o, scale=0.05)

    lin("latent_in", W, CIN)
    lin("time_in.in_layer", W, 256)
    lin("time_in.out_layer", W, W)
    if guidance:
        lin("guidance_in.in_layer", W, 256)
        lin("guidance_in.out_layer", W, W)
    lin("cond_in", W, CTX)
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lin(f"{p}_mod.lin", 6 * W, W)
            lin(f"{p}_attn.qkv", 3 * W, W)
            sd[f"{p}_attn.norm.query_norm.scale"] = 1 + _rand(g, d, scale=0.1)
            sd[f"{p}_attn.norm.key_norm.scale"] = 1 + _rand(g, d, scale=0.1)
            lin(f"{p}_attn.proj", W, W)
            lin(f"{p}_mlp.0", 4 * W, W)
            lin(f"{p}_mlp.2", W, 4 * W)
    for i in range(single):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 7 * W, W)
        lin(f"{p}.linear2", W, 5 * W)
        sd[f"{p}.norm.query_norm.scale"] = 1 + _rand(g, d, scale=0.1)
        sd[f"{p}.norm.key_norm.scale"] = 1 + _rand(g, d, scale=0.1)
        lin(f"{p}.modulation.lin", 3 * W, W)
    lin("final_layer.linear", CIN, W)
    lin("final_layer.adaLN_modulation.1", 2 * W, W)
    return sd


class Ref20:
    """Hunyuan3DDiT.forward on released keys (Flux double / single stream, vecset.md 2.1)."""

    def __init__(self, sd, depth=2, single=2):
        self.sd, self.depth, self.single = sd, depth, single

    def lin(self, n, x):
        return F.linear(x, self.sd[f"{n}.weight"], self.sd[f"{n}.bias"])

    def rms(self, n, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.sd[f"{n}.scale"]

    def temb(self, prefix, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=t.dtype) / 128)
        arg = (1000 * t)[:, None] * freqs[None]
        e = torch.cat([arg.cos(), arg.sin()], -1)
        return self.lin(f"{prefix}.out_layer", F.silu(self.lin(f"{prefix}.in_layer", e)))

    @staticmethod
    def ln(x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)

    def heads(self, qkv, prefix):
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, H, W // H).permute(2, 0, 3, 1, 4)
        return self.rms(f"{prefix}.query_norm", q), self.rms(f"{prefix}.key_norm", k), v

    @staticmethod
    def attend(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        o = w @ v
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    def __call__(self, x, t, ctx, guidance=None):
        img = self.lin("latent_in", x)
        vec = self.temb("time_in", t)
        if guidance is not None:
            vec = vec + self.temb("guidance_in", guidance)
        txt = self.lin("cond_in", ctx)
        for i in range(self.depth):
            p = f"double_blocks.{i}"
            mi = self.lin(f"{p}.img_mod.lin", F.silu(vec))[:, None].chunk(6, -1)
            mt = self.lin(f"{p}.txt_mod.lin", F.silu(vec))[:, None].chunk(6, -1)
            qi, ki, vi = self.heads(self.lin(f"{p}.img_attn.qkv", (1 + mi[1]) * self.ln(img) + mi[0]),
                                    f"{p}.img_attn.norm")
            qt, kt, vt = self.heads(self.lin(f"{p}.txt_attn.qkv", (1 + mt[1]) * self.ln(txt) + mt[0]),
                                    f"{p}.txt_attn.norm")
            a = self.attend(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
            at, ai = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
            img = img + mi[2] * self.lin(f"{p}.img_attn.proj", ai)
            img = img + mi[5] * self.lin(f"{p}.img_mlp.2", F.gelu(
                self.lin(f"{p}.img_mlp.0", (1 + mi[4]) * self.ln(img) + mi[3]), approximate="tanh"))
            txt = txt + mt[2] * self.lin(f"{p}.txt_attn.proj", at)
            txt = txt + mt[5] * self.lin(f"{p}.txt_mlp.2", F.gelu(
                self.lin(f"{p}.txt_mlp.0", (1 + mt[4]) * self.ln(txt) + mt[3]), approximate="tanh"))
        h = torch.cat([txt, img], 1)
        for i in range(self.single):
            p = f"single_blocks.{i}"
            shift, scale, gate = self.lin(f"{p}.modulation.lin", F.silu(vec))[:, None].chunk(3, -1)
            qkv, mlp = self.lin(f"{p}.linear1", (1 + scale) * self.ln(h) + shift).split([3 * W, 4 * W], -1)
            q, k, v = self.heads(qkv, f"{p}.norm")
            h = h + gate * self.lin(f"{p}.linear2", torch.cat([self.attend(q, k, v),
                                                               F.gelu(mlp, approximate="tanh")], -1))
        h = h[:, txt.shape[1]:]
        shift, scale = self.lin("final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, -1)
        return self.lin("final_layer.linear", (1 + scale[:, None]) * self.ln(h) + shift[:, None])


# ----------------------------------------------------------------------------------------------
# Released folders
# ----------------------------------------------------------------------------------------------

PARAMS_21 = dict(input_size=64, in_channels=CIN, hidden_size=W, context_dim=CTX, depth=5, num_heads=H,
                 qk_norm=True, text_len=L, with_decoupled_ca=False, use_attention_pooling=False,
                 qk_norm_type="rms", qkv_bias=False, use_pos_emb=False, num_moe_layers=2, num_experts=4,
                 moe_top_k=2)
PARAMS_20 = dict(in_channels=CIN, context_in_dim=CTX, hidden_size=W, mlp_ratio=4.0, num_heads=H, depth=2,
                 depth_single_blocks=2, axes_dim=[W // H], theta=10000, qkv_bias=True, guidance_embed=False)


def write_dit_release(folder, sd, *, family="21", params=None, vae_params=None, conditioner=None,
                      safetensors=False):
    """A DiT release folder as published: config.yaml (model, vae, conditioner, scheduler, image_processor)
    and model.fp16.ckpt (or .safetensors) with model / vae / conditioner groups, every tensor fp16."""
    folder.mkdir(parents=True, exist_ok=True)
    target = ("hy3dshape.models.denoisers.hunyuandit.HunYuanDiTPlain" if family == "21"
              else "hy3dgen.shapegen.models.Hunyuan3DDiT")
    cond_sd, cond_kwargs = conditioner or ({}, {"image_size": 518, "use_cls_token": True})
    doc = {"model": {"target": target, "params": params or (PARAMS_21 if family == "21" else PARAMS_20)},
           "vae": {"target": "hy3dshape.models.autoencoders.ShapeVAE",
                   "params": vae_params or {"num_latents": 64, "embed_dim": CIN, "scale_factor": 1.25}},
           "conditioner": {"target": "hy3dshape.models.conditioner.SingleImageEncoder",
                           "params": {"main_image_encoder": {"type": "DinoImageEncoder", "kwargs": cond_kwargs}}},
           "scheduler": {"target": "hy3dshape.schedulers.FlowMatchEulerDiscreteScheduler",
                         "params": {"num_train_timesteps": 1000}},
           "image_processor": {"target": "hy3dshape.preprocessors.ImageProcessorV2",
                               "params": {"size": 512, "border_ratio": 0.15}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    groups = {"model": {k: v.half() for k, v in sd.items()}, "vae": {},
              "conditioner": {k: v.half() for k, v in cond_sd.items()}}
    if safetensors:
        from safetensors.torch import save_file
        save_file({f"{g}.{k}": v for g, s in groups.items() for k, v in s.items()},
                  str(folder / "model.fp16.safetensors"))
    else:
        torch.save(groups, folder / "model.fp16.ckpt")
    return folder


def _inputs(dtype, n=10, b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, CIN, generator=g).to(dtype)
    t = torch.rand(b, generator=g).to(dtype)
    ctx = torch.randn(b, L, CTX, generator=g).to(dtype)
    return x, t, ctx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("safetensors", [False, True])
def test_hunyuan21_release_reproduces_the_reference_forward(tmp_path, dtype, safetensors):
    sd = hy21_state()
    folder = write_dit_release(tmp_path / "hunyuan3d-dit-v2-1", sd, safetensors=safetensors)
    assert model_kind(folder, ("hunyuan21_dit",)) == "hunyuan21_dit"
    model, kind = load_dit(folder)
    assert kind == "hunyuan21_dit" and isinstance(model, Hunyuan21DiT) and not model.training
    c = model.config
    assert (c.width, c.depth, c.heads, c.moe_layers, c.num_experts, c.num_tokens, c.cond_tokens) == \
        (W, 5, H, 2, 4, 64, 1370)
    ref = Ref21({k: v.half().to(dtype) for k, v in sd.items()})  # the fp16 weights the folder holds
    x, t, ctx = _inputs(dtype)
    with torch.no_grad():
        want = ref(x, t, ctx)
        got = model.to(dtype)(x, t, ctx)
    assert want.abs().mean() > 0.1
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("guidance", [False, True])
def test_hunyuan20_release_reproduces_the_reference_forward(tmp_path, dtype, guidance):
    sd = hy20_state(guidance=guidance)
    folder = write_dit_release(tmp_path / "hunyuan3d-dit-v2-0", sd, family="20",
                               params={**PARAMS_20, "guidance_embed": guidance})
    model, kind = load_dit(folder)
    assert kind == "hunyuan20_dit" and isinstance(model, Hunyuan20DiT)
    assert model.config.num_tokens == 64 and model.config.guidance_embed == guidance
    ref = Ref20({k: v.half().to(dtype) for k, v in sd.items()})
    x, t, ctx = _inputs(dtype)
    gs = torch.full((2,), 3.5, dtype=dtype) if guidance else None
    with torch.no_grad():
        want = ref(x, t, ctx, guidance=gs)
        got = model.to(dtype)(x, t, ctx, guidance=gs)
    assert want.abs().mean() > 0.05
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_a_dit_release_is_a_dit_to_load_dit_and_its_vae_group_a_vae_to_load_vae(tmp_path):
    from test_vecset_vae import _hunyuan_params, hunyuan_state_dict  # the ShapeVAE test weights

    folder = write_dit_release(tmp_path / "dit", hy20_state(), family="20",
                               vae_params=_hunyuan_params(embed_dim=CIN))
    groups = torch.load(folder / "model.fp16.ckpt", weights_only=True)
    groups["vae"] = {k: v.half() for k, v in hunyuan_state_dict().items()}
    torch.save(groups, folder / "model.fp16.ckpt")
    assert load_dit(folder)[1] == "hunyuan20_dit"
    assert load_vae(folder)[1] == "vecset_vae"


def test_release_errors_list_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = hy21_state()
    sd.pop("blocks.0.attn1.to_k.weight")  # a fused projection part
    sd.pop("final_layer.linear.bias")
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    sd["blocks.2.norm1.weight"] = torch.ones(W + 1)
    folder = write_dit_release(tmp_path / "bad", sd)
    with pytest.raises(ValueError) as e:
        load_dit(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(folder / "model.fp16.ckpt"))  # one line naming the file
    for key in ("blocks.0.attn1.to_{q,k,v}.weight", "out_layer.bias", "blocks.1.extra.weight",
                "blocks.2.norm1.weight"):
        assert key in msg, (key, msg)


def test_release_config_errors_name_the_file(tmp_path):
    folder = write_dit_release(tmp_path / "pool", hy21_state(), params={**PARAMS_21, "use_attention_pooling": True})
    with pytest.raises(ValueError, match=r"config\.yaml.*use_attention_pooling"):
        load_dit(folder)


@pytest.mark.parametrize("family", ["21", "20"])
def test_export_release_round_trips_keys_layout_and_outputs(tmp_path, family):
    sd = hy21_state() if family == "21" else hy20_state()
    src = write_dit_release(tmp_path / "src", sd, family=family)
    model, _ = load_dit(src)
    with torch.no_grad():  # a changed model (fine-tuned): its weights must reach the released layout
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_release(model, src, tmp_path / "out")
    released, template = read_group(out, "model"), read_group(src, "model")
    assert set(released) == set(template)
    assert all(released[k].shape == template[k].shape and released[k].dtype == torch.float16 for k in template)
    assert (out / "config.yaml").read_text() == (src / "config.yaml").read_text()
    again, _ = load_dit(out)
    x, t, ctx = _inputs(torch.float32)
    with torch.no_grad():
        want = model.half().float()(x, t, ctx)  # the export is fp16, like the release
        torch.testing.assert_close(again(x, t, ctx), want, rtol=1e-5, atol=1e-5)
    ref = (Ref21 if family == "21" else Ref20)({k: v.float() for k, v in released.items()})
    with torch.no_grad():  # the reference forward on the exported file gives the model's outputs
        torch.testing.assert_close(ref(x, t, ctx), want, rtol=1e-4, atol=1e-4)


def test_moe_routing_trains_the_chosen_experts_and_adds_the_balance_loss():
    model = Hunyuan21DiT.from_preset("tiny").train()
    moe = model.blocks[-1].moe
    x = torch.randn(64, moe.gate.in_features)
    out = moe(x)
    assert moe.aux_loss is not None and float(moe.aux_loss) > 0
    out.sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0  # the aux term reaches it
    used = [e for e in moe.experts if e.fc1.weight.grad is not None and e.fc1.weight.grad.abs().sum() > 0]
    assert 1 <= len(used) <= len(moe.experts)
    moe.eval()
    with torch.no_grad():  # eval: no aux loss; output = weighted top-2 + shared, computed by hand
        probs = moe.gate(x).softmax(-1)
        top, idx = probs.topk(2, -1)
        want = moe.shared(x) + sum((top * (idx == e)).sum(-1, keepdim=True) * moe.experts[e](x)
                                   for e in range(len(moe.experts)))
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling: the reference step rule and guidance
# ----------------------------------------------------------------------------------------------


def reference_euler(v, x, n_calls, cond, uncond, scale):
    """Hunyuan's loop: sigmas = linspace(0, 1, N) + [1]; N calls; x += (s[i+1] - s[i]) * guided v."""
    sigmas = list(np.linspace(0, 1, n_calls)) + [1.0]
    for i in range(n_calls):
        t = torch.full((x.shape[0],), sigmas[i], dtype=x.dtype)
        vc, vu = v(x, t, cond), v(x, t, uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * (vu + scale * (vc - vu))
    return x


def test_sampler_reproduces_the_reference_euler_loop_and_guidance():
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def v(x, t, c):  # closed form: depends on x, t and the condition
        return a * x * (1 + t[:, None, None]) + c.mean(dim=(1, 2))[:, None, None]

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    null = torch.zeros_like(cond)
    want = reference_euler(v, x0, 50, cond, null, 5.0)
    got = sample(v, x0, steps=49, method="euler", cond=cond, null_cond=null, cfg_scale=5.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # by hand for N = 3 calls: two half steps, the third call has zero length
    h1 = x0 + 0.5 * (v(x0, torch.zeros(2, dtype=torch.float64), null) + 5.0 * (
        v(x0, torch.zeros(2, dtype=torch.float64), cond) - v(x0, torch.zeros(2, dtype=torch.float64), null)))
    th = torch.full((2,), 0.5, dtype=torch.float64)
    h2 = h1 + 0.5 * (v(h1, th, null) + 5.0 * (v(h1, th, cond) - v(h1, th, null)))
    torch.testing.assert_close(reference_euler(v, x0, 3, cond, null, 5.0), h2, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Image preprocessing and the release's own encoder
# ----------------------------------------------------------------------------------------------


def _rgba_object(h=300, w=400, box=(60, 100, 180, 260), colour=(200, 40, 40)):
    arr = np.zeros((h, w, 4), np.uint8)
    y0, x0, y1, x1 = box
    arr[y0:y1, x0:x1, :3] = colour
    arr[y0:y1, x0:x1, 3] = 255
    return arr


def test_hunyuan_preprocessing_recentres_on_white_with_the_border():
    px = preprocess_image_hunyuan(_rgba_object(), size=518)
    assert px.shape == (3, 518, 518)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    rgb = px * std + mean
    fg = (rgb - 1).abs().amax(0) > 0.1  # not white
    ys, xs = torch.nonzero(fg, as_tuple=True)
    # the longer side (160 px of a 400 px canvas) becomes 0.85 of the square: 0.85 * 518 = 440 px
    assert abs((xs.max() - xs.min() + 1).item() - 0.85 * 518) < 6
    assert abs((xs.max() + xs.min()).item() / 2 - 259) < 3 and abs((ys.max() + ys.min()).item() / 2 - 259) < 3
    corner = rgb[:, :20, :20]
    torch.testing.assert_close(corner, torch.ones_like(corner), atol=1e-3, rtol=0)


def test_opaque_images_get_their_flat_background_removed_or_a_clear_error():
    rgba = _rgba_object()
    flat = rgba.copy()
    flat[rgba[..., 3] == 0, :3] = 255
    flat[..., 3] = 255
    torch.testing.assert_close(preprocess_image_hunyuan(flat[..., :3]), preprocess_image_hunyuan(rgba),
                               atol=0.02, rtol=0)
    photo = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"^shot\.jpg: no alpha channel and the background is not one flat colour"):
        separate_background(photo, source="shot.jpg")
    with pytest.raises(ValueError, match="one flat colour"):
        separate_background(np.full((32, 32, 3), 255, np.uint8))


def _tiny_dinov2(width=CTX, heads=2):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads, mlp_ratio=2,
                       patch_size=14, image_size=56, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    return cfg, Dinov2Model(cfg).eval()


def test_release_conditioner_is_the_bundled_dinov2_with_hunyuans_recipe(tmp_path):
    pytest.importorskip("transformers")
    cfg, dino = _tiny_dinov2()
    cond_sd = {f"main_image_encoder.model.{k}": v for k, v in dino.state_dict().items()}
    folder = write_dit_release(tmp_path / "dit", hy21_state(), conditioner=(
        cond_sd, {"config": cfg.to_dict(), "image_size": 56, "use_cls_token": True}))
    enc = release_conditioner(folder)
    img = _rgba_object()
    pixels = enc.preprocess([img])
    assert pixels.shape == (1, 3, 56, 56)
    tokens = enc(pixels)
    assert tokens.shape == (1, 17, CTX)  # CLS + 4 x 4 patches
    dino_fp16 = dino.half().float()  # the release stores fp16
    with torch.no_grad():
        torch.testing.assert_close(tokens, dino_fp16(pixel_values=pixels).last_hidden_state, rtol=1e-5, atol=1e-5)
    # a release that names a hub model instead of writing the config: read from the shapes (64-channel heads)
    cfg2, dino2 = _tiny_dinov2(width=128, heads=2)
    sd2 = {f"main_image_encoder.model.{k}": v for k, v in dino2.state_dict().items()}
    folder2 = write_dit_release(tmp_path / "dit2", hy21_state(), conditioner=(sd2, {"image_size": 56}))
    with torch.no_grad():
        want = dino2.half().float()(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(release_conditioner(folder2)(pixels), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Image-to-3D from released folders
# ----------------------------------------------------------------------------------------------


def _release_pair(tmp_path, family="21", scale=1.25):
    from test_vecset_vae import HY, _hunyuan_params, _write_release, hunyuan_state_dict

    pytest.importorskip("transformers")
    cfg, dino = _tiny_dinov2()
    cond = ({f"main_image_encoder.model.{k}": v for k, v in dino.state_dict().items()},
            {"config": cfg.to_dict(), "image_size": 56, "use_cls_token": True})
    vae_params = _hunyuan_params(scale_factor=scale, num_latents=32)
    sd = hy21_state() if family == "21" else hy20_state()
    cin = HY["latent"]
    assert cin == CIN
    dit = write_dit_release(tmp_path / "dit", sd, family=family, conditioner=cond, vae_params=vae_params)
    vae = tmp_path / "vae"
    _write_release(vae, hunyuan_state_dict(), _hunyuan_params(scale_factor=scale, num_latents=32))
    return dit, vae


@pytest.mark.parametrize("family", ["21", "20"])
def test_generate_image_to_3d_from_release_folders(tmp_path, family):
    import json

    from shapeflow.cli import main

    dit, vae = _release_pair(tmp_path, family)
    img = tmp_path / "photo.png"
    Image.fromarray(_rgba_object(), mode="RGBA").save(img)
    out = tmp_path / "out"
    rc = main(["generate", "--image", str(img), "--dit", str(dit), "--vae", str(vae), "--out", str(out),
               "--num", "1", "--steps", "3", "--resolution", "32"])
    info = json.loads((out / "generate.json").read_text())
    assert info["method"] == "euler" and info["cfg"] == 5.0 and info["num_tokens"] == 32  # Hunyuan defaults
    assert info["nfe"] == 3
    assert rc in (0, 1) and (out / "preview.png").is_file()  # random weights may decode no surface
    if rc == 0:
        assert (out / "sample_000.glb").is_file()


def test_generate_refuses_mismatched_folders_and_images_without_alpha(tmp_path, capsys):
    from test_vecset_vae import _hunyuan_params, _write_release, hunyuan_state_dict

    from shapeflow.cli import main

    dit, _ = _release_pair(tmp_path)
    other = tmp_path / "vae2"
    _write_release(other, hunyuan_state_dict(), _hunyuan_params(scale_factor=0.99, num_latents=32))
    img = tmp_path / "photo.png"
    Image.fromarray(_rgba_object(), mode="RGBA").save(img)
    assert main(["generate", "--image", str(img), "--dit", str(dit), "--vae", str(other), "--out",
                 str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "do not match" in err and "1.25" in err and "0.99" in err
    photo = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["generate", "--image", str(photo), "--dit", str(dit), "--vae", str(tmp_path / "vae"), "--out",
                 str(tmp_path / "o2")]) != 0
    err = capsys.readouterr().err
    assert "photo.jpg: no alpha channel" in err


def test_generate_on_a_release_follows_the_reference_loop_step_by_step(tmp_path):
    """shapeflow.generate with the release's defaults = Hunyuan's Euler loop with guidance 5 on the reference
    forward (fp16 weights), from the same noise: the sampled latents in the DiT's (scaled) space."""
    from shapeflow.generate import generate
    from shapeflow.sampling import initial_noise

    dit, vae = _release_pair(tmp_path)
    model, kind = load_dit(dit)
    vae_model, vae_kind = load_vae(vae)
    sd = read_group(dit, "model")
    ref = Ref21({k: v.double() for k, v in sd.items()})
    cond = torch.randn(2, L, CTX, generator=torch.Generator().manual_seed(5))
    out = generate(model, vae_model, dit_kind=kind, vae_kind=vae_kind, num=2, cond=cond, steps=4,
                   method="euler", cfg_scale=5.0, num_tokens=32, decode=False)  # float32, as users run it
    noise = initial_noise((2, 32, CIN), seed=[0, 1]).double()
    want = reference_euler(ref, noise, 5, cond.double(), torch.zeros_like(cond).double(), 5.0)
    assert (want - noise).abs().mean() > 0.1
    torch.testing.assert_close((out.latents * 1.25).double(), want, rtol=1e-4, atol=1e-4)  # VAE scale 1.25
    assert out.nfe == 4


def test_guidance_distilled_release_gets_the_scale_as_input_and_one_pass():
    from shapeflow.generate import generate

    model = Hunyuan20DiT.from_preset("tiny", guidance_embed=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    calls = []

    class Spy(torch.nn.Module):  # records the batch size and guidance of every call
        config = model.config

        def forward(self, x, t, c, guidance=None):
            calls.append((x.shape[0], None if guidance is None else float(guidance[0])))
            return model(x, t, c, guidance=guidance)

        def denormalize_latents(self, x):
            return x

    class Identity(torch.nn.Module):
        def unscale_latents(self, x):
            return x

    cond = torch.randn(2, 17, 32)
    generate(Spy(), Identity(), dit_kind="hunyuan20_dit", vae_kind="vecset_vae", num=2, cond=cond, steps=3,
             method="euler", cfg_scale=4.0, num_tokens=8, decode=False)
    assert calls == [(2, 4.0)] * 3  # no doubled cond/uncond batch, the scale goes in


def test_image_to_3d_in_three_lines(tmp_path):
    from shapeflow.generate import image_to_3d

    dit, vae = _release_pair(tmp_path)
    img = tmp_path / "photo.png"
    Image.fromarray(_rgba_object(), mode="RGBA").save(img)
    out = image_to_3d(img, dit, vae, num=2, steps=2, resolution=32)
    assert len(out.meshes) == 2 and out.nfe == 2 and out.latents.shape == (2, 32, CIN)
    with pytest.raises(ValueError, match="no alpha channel"):
        image_to_3d((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), dit, vae, steps=1)
