"""diffusers UNets through the same core (hf.unet.DiffusersUNet + quant/adapters/diffusers_unet.py), on tiny
random-weight UNet2DConditionModel (guided) and UNet2DModel instances built from configs."""
import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from hf.unet import DiffusersUNet  # noqa: E402
from quant.adapters import adapter_for, check_adapter  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from quant.deploy import convert  # noqa: E402
from quant.dilation import dilate  # noqa: E402
from quant.layers import QuantLayer  # noqa: E402
from quant.distill import DistillConfig  # noqa: E402
from quant.methods import MethodContext, quantize  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig  # noqa: E402
from quant.model import QuantModel, frozen, quant_enabled  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402

STEPS = [0, 333, 666]                                   # a 3-step DDIMScheduler's timesteps (leading spacing)


def conditional():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def unconditional():
    torch.manual_seed(1)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8).eval()


def inputs(unet, n=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    cond = ({"encoder_hidden_states": torch.randn(n, 5, c.cross_attention_dim, generator=gen)}
            if hasattr(c, "cross_attention_dim") else {})
    return x, cond


def calibration(unet, per_step=2):
    x, cond = inputs(unet, per_step * len(STEPS), seed=3)
    return CalibSet(x, torch.tensor(STEPS * per_step), cond)


@pytest.mark.parametrize("build", [conditional, unconditional])
def test_the_wrapped_unet_is_the_diffusers_one_to_float_rounding(build):
    unet = build()
    x, cond = inputs(unet)
    t = torch.full((len(x),), 333)
    with torch.no_grad():
        want = unet(x, t, **cond).sample                          # diffusers' own SDPA processor
        got = DiffusersUNet(copy.deepcopy(unet))(x, t, **cond)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-5
    net = DiffusersUNet(copy.deepcopy(unet))
    check_adapter(net, adapter_for(net))                          # every name the adapter gives exists


@pytest.mark.parametrize("build", [conditional, unconditional])
def test_dilation_and_the_split_channels_keep_the_fp_function(build):
    net = DiffusersUNet(build())
    adapter = adapter_for(net)
    splits = adapter.split_channels(net)
    assert splits and all(name.startswith("unet.up_blocks.") for name in splits)
    q = QuantModel(net, QuantConfig(weight_bit=4, act_bit=4, split=True, temporal=True), STEPS)
    x, cond = inputs(net.unet)
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        before = q(x, 333, **cond)
        dilate(q)
        after = q(x, 333, **cond)
    assert float((after - before).abs().max()) < 1e-4 * float(before.abs().max())
    assert q.unquantized == []


def test_dilatequant_w4a4_distils_saves_reloads_and_samples_with_guidance(tmp_path):
    unet = conditional()
    net = DiffusersUNet(copy.deepcopy(unet))
    calib = calibration(unet)
    method = DilateQuantConfig(distill=DistillConfig(iters=1, batch_size=2, cache_batch_size=len(calib.t)))
    q = quantize(net, QuantConfig(weight_bit=4, act_bit=4, split=True), method,
                 MethodContext(STEPS, calib, tmp_path, batch_size=len(calib.t)))
    assert len(list((tmp_path / "distill").glob("unit_*.pt"))) == len(adapter_for(net).units(net))
    save_quantized(tmp_path / "quantized.pt", q, "dilatequant")
    again, _ = load_quantized(tmp_path / "quantized.pt", DiffusersUNet(copy.deepcopy(unet)))
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(3)
    assert sorted(int(t) for t in scheduler.timesteps) == STEPS     # the scheduler's integer timesteps: TPQ's slots
    x, cond = inputs(unet, n=2, seed=5)
    context = torch.cat([torch.zeros_like(cond["encoder_hidden_states"]), cond["encoder_hidden_states"]])

    def sample(model):
        z = x.clone()
        for t in scheduler.timesteps:                               # 0-d timesteps, guidance 3.0
            e_u, e_c = model(torch.cat([z, z]), t, encoder_hidden_states=context).chunk(2)
            z = scheduler.step(e_u + 3.0 * (e_c - e_u), t, z).prev_sample
        return z
    with torch.no_grad(), frozen(q), frozen(again):
        a, b = sample(q), sample(again)
        fp = sample(DiffusersUNet(unet))
    assert torch.equal(a, b) and torch.isfinite(a).all() and not torch.equal(a, fp)
    integer = convert(q, compiled=False)                            # the integer backend runs it too
    with torch.no_grad(), frozen(q):
        want = q(torch.cat([x, x]), 333, encoder_hidden_states=context)
        got = integer(torch.cat([x, x]), 333, encoder_hidden_states=context)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())


def test_an_unconditional_unet_calibrates_per_timestep():
    unet = unconditional()
    net = DiffusersUNet(unet)
    q = calibrate(QuantModel(net, QuantConfig(weight_bit=8, act_bit=8, temporal=True), STEPS), calibration(unet),
                  batch_size=6)
    x, _ = inputs(unet)
    with torch.no_grad(), frozen(q):
        out = q(x, torch.tensor(666))
    with torch.no_grad():
        ref = unet(x, 666).sample
    assert float((out - ref).abs().mean()) < 0.1 * float(ref.abs().mean())


def tiny_pipeline(tmp_path):
    """A StableDiffusionPipeline of tiny random parts: the conditional UNet, a one-level AutoencoderKL, a 2-layer
    CLIP text tower and a letter-level CLIP tokenizer written to disk."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from test_ldm_encoders import write_tiny_tokenizer
    from tools.tiny_ldm import TINY_CLIP_TEXT
    write_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), latent_channels=4,
                                  norm_num_groups=8, sample_size=8).eval()
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), model_max_length=77), unet=conditional(),
        scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def test_a_pipeline_unet_is_quantized_in_a_few_lines_on_its_own_sampling(tmp_path):
    from hf.pipeline import quantize_pipeline
    pipe = tiny_pipeline(tmp_path)
    fp_image = pipe("a horse", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    method = DilateQuantConfig(distill=DistillConfig(iters=1, batch_size=2, cache_batch_size=4))
    pipe.unet = quantize_pipeline(pipe, QuantConfig(weight_bit=4, act_bit=4, split=True), method, prompts=["a horse",
                                  "zebra"], steps=3, guidance=3.0, run_dir=tmp_path / "run", batch_size=4)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(3)
    assert pipe.unet.qmodel.schedule.tolist() == sorted(int(t) for t in scheduler.timesteps)   # TPQ's slots
    image = pipe("a horse", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == fp_image.shape and (image != fp_image).any()
    with pytest.raises(Exception, match="timestep"):                   # other steps: slots it has none for
        pipe("a horse", num_inference_steps=4, guidance_scale=3.0, output_type="np")
    # weights quantized once for every call of every run, again only after they change
    calls, op_weight = [], QuantLayer.op_weight
    layers = sum(1 for _ in pipe.unet.qmodel.quant_layers())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QuantLayer, "op_weight", lambda self: calls.append(1) or op_weight(self))
        again = [pipe("a horse", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
        assert len(calls) == 0 and all(np.array_equal(a, image) for a in again)    # frozen by the first run
        with torch.no_grad():
            next(pipe.unet.qmodel.parameters()).mul_(1.0)
        pipe("a horse", num_inference_steps=3, guidance_scale=3.0, output_type="np")
        assert len(calls) == layers


def test_a_scheduler_with_non_integer_timesteps_is_refused_naming_it():
    from common.errors import UsageError
    from hf.pipeline import scheduler_timesteps
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    scheduler.set_timesteps(5)
    with pytest.raises(UsageError, match="EulerDiscreteScheduler calls the UNet at non-integer timesteps"):
        scheduler_timesteps(scheduler)


def test_the_command_line_quantizes_a_local_pipeline_folder_and_writes_the_run(tmp_path):
    from common.errors import UsageError
    from experiments.diffusers_task import main
    tiny_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    with pytest.raises(UsageError, match="is not a diffusers pipeline folder"):
        main(["--model_dir", str(tmp_path / "nope"), "--prompt", "a horse", "--outdir", str(tmp_path / "x")])
    rec = main(["--model_dir", str(tmp_path / "pipe"), "--prompt", "a horse", "--prompt", "zebra", "--steps", "3",
                "--guidance", "3", "--n_samples", "2", "--outdir", str(tmp_path / "run"), "--ptq", "--quant_mode",
                "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--split", "--cali_n", "2",
                "--cali_iters", "1", "--distill_batch_size", "2", "--cali_batch_size", "4"])
    assert rec["method"] == "dilatequant" and rec["method_identity"]["name"] == "dilatequant"
    assert rec["pipeline"] == "StableDiffusionPipeline" and {"torch", "device"} <= set(rec["provenance"])
    for name in ("samples.npz", "grid.png", "results.json", "quantized.pt"):
        assert (tmp_path / "run" / name).is_file()
    import numpy as np
    assert np.load(tmp_path / "run" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)


def dit():
    torch.manual_seed(6)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=8).eval(), {"class_labels": torch.tensor([1, 2, 3, 4])}


def pixart():
    torch.manual_seed(7)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                               cross_attention_dim=32, caption_channels=24, norm_num_groups=8).eval()
    return model, {"encoder_hidden_states": torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(8))}


@pytest.mark.parametrize("build", [dit, pixart])
def test_dit_and_pixart_quantize_per_timestep_through_the_same_core(build, tmp_path):
    from hf.unet import DiffusersTransformer
    model, cond = build()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if "encoder_hidden_states" in cond else {}
    with torch.no_grad():
        want = model(x, timestep=torch.full((4,), 333), return_dict=False, **cond, **extra)[0]
        net = DiffusersTransformer(copy.deepcopy(model))
        got = net(x, torch.tensor(333), **cond)                      # a 0-d timestep, as schedulers pass it
    assert float((got - want).abs().max()) < 1e-5
    check_adapter(net, adapter_for(net))
    assert adapter_for(net).norm_producers(net) == {}                 # ada-norms: s stays in the quantizers
    calib = CalibSet(torch.cat([x, x]), torch.tensor(STEPS + STEPS[:1] + STEPS + STEPS[:1]),
                     {k: torch.cat([v, v]) for k, v in cond.items()})
    method = DilateQuantConfig(distill=DistillConfig(iters=1, batch_size=2, cache_batch_size=8))
    q = quantize(net, QuantConfig(weight_bit=4, act_bit=4), method, MethodContext(STEPS, calib, tmp_path, 8))
    with torch.no_grad(), frozen(q):
        out = q(x, 333, **cond)
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert all("(Embedding)" in name for name in q.unquantized)      # DiT's class table stays FP


@pytest.mark.parametrize("build", [conditional, unconditional, dit, pixart],
                         ids=["unet2d-condition", "unet2d", "dit", "pixart"])
def test_wrapped_diffusers_models_stay_on_the_meta_device_and_run_there(build):
    """Everything the wrappers and the quantized model create follows the model's device: on `meta` (no data), a
    forward only runs if nothing is read on the host."""
    from hf.unet import DiffusersTransformer
    from quant.range_search import init_weight_quantizers
    from test_device import off_model
    built = build()
    model, cond = built if isinstance(built, tuple) else (built, None)
    wrap = DiffusersTransformer if cond is not None else DiffusersUNet
    net = wrap(model.to("meta"))
    if cond is None:
        x, cond = inputs(model)
    else:
        x = torch.randn(4, 4, 8, 8)
    meta = torch.device("meta")
    x, cond = x.to(meta), {k: v.to(meta) for k, v in cond.items()}
    q = QuantModel(net, QuantConfig(weight_bit=4, act_bit=4, temporal=True, split=True), STEPS)
    assert off_model(q, meta, torch.float32) == []
    init_weight_quantizers(q)
    for _, module in q.act_quant_modules():
        for a in module.a_quant:
            a.set_range(torch.zeros_like(a.delta), torch.ones_like(a.delta))
    with torch.no_grad(), frozen(q):
        out = q(x, torch.full((len(x),), STEPS[1], device=meta), **cond)
    assert out.device == meta and out.shape[0] == len(x)


def tiny_vae():
    torch.manual_seed(5)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), latent_channels=4,
                                   norm_num_groups=8, sample_size=8).eval()


def tiny_t5_tokenizer():
    """A word-level tokenizer of a few words, with T5's pad and end tokens (no sentencepiece file needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "</s>", "<unk>", "a", "horse", "zebra", "cat", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_dit_pipeline():
    torch.manual_seed(6)                    # DiTPipeline's null class is 1000 (ImageNet's): the table needs its row
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                  num_embeds_ada_norm=1000, norm_num_groups=8).eval()
    return diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def tiny_pixart_pipeline():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(8)
    encoder = T5EncoderModel(T5Config(vocab_size=9, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    return diffusers.PixArtAlphaPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=encoder, vae=tiny_vae(),
                                         transformer=pixart()[0],
                                         scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def test_the_attention_processor_matches_sdpa_with_pixarts_caption_mask():
    from hf.unet import DiffusersTransformer
    model, cond = pixart()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(4, 5)
    mask[:, 3:] = 0                                                  # two padded caption tokens
    micro = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        want = model(x, timestep=torch.full((4,), 333), encoder_attention_mask=mask, return_dict=False, **cond,
                     **micro)[0]
        unmasked = model(x, timestep=torch.full((4,), 333), return_dict=False, **cond, **micro)[0]
        got = DiffusersTransformer(copy.deepcopy(model))(x, torch.tensor(333), encoder_attention_mask=mask, **cond)
    assert float((got - want).abs().max()) < 1e-5 < float((unmasked - want).abs().max())


@pytest.mark.parametrize("build, conditioning", [(tiny_dit_pipeline, {"class_labels": [1, 2]}),
                                                 (tiny_pixart_pipeline, {"prompts": ["a horse", "zebra"]})],
                         ids=["dit", "pixart"])
def test_dit_and_pixart_pipelines_are_quantized_in_a_few_lines(build, conditioning, tmp_path):
    from hf.pipeline import denoiser_attr, quantize_pipeline
    pipe = build()
    call = ({"class_labels": [1]} if "class_labels" in conditioning else    # PixArt bins only its real sizes
            {"prompt": "a horse", "use_resolution_binning": False}) | \
        {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
    fp_image = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    method = DilateQuantConfig(distill=DistillConfig(iters=1, batch_size=2, cache_batch_size=4))
    assert denoiser_attr(pipe) == "transformer"
    pipe.transformer = quantize_pipeline(pipe, QuantConfig(weight_bit=4, act_bit=4), method, **conditioning, steps=3,
                                         guidance=3.0, run_dir=tmp_path / "run", batch_size=1)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(3)
    assert pipe.transformer.qmodel.schedule.tolist() == sorted(int(t) for t in scheduler.timesteps)
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == fp_image.shape and np.isfinite(image).all() and (image != fp_image).any()
    save_quantized(tmp_path / "q.pt", pipe.transformer.qmodel, "dilatequant")
    from hf.unet import wrap_diffusers
    reloaded, _ = load_quantized(tmp_path / "q.pt", wrap_diffusers(copy.deepcopy(build().transformer)))
    pipe.transformer.qmodel = reloaded.eval()
    pipe.transformer.release()
    again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(again, image)


def test_guided_calibration_keeps_both_halves_of_every_step_in_any_batch():
    from hf.pipeline import guided_calibration, pipeline_conditions
    from hf.unet import wrap_diffusers
    pipe = tiny_dit_pipeline()
    net = wrap_diffusers(copy.deepcopy(pipe.transformer))
    conditions = pipeline_conditions(pipe, "DiTTransformer2DModel", None, [1, 2, 3], True, "", torch.device("cpu"))
    assert conditions.uncond["class_labels"].tolist() == [1000] * 3         # DiT's null class: its last row
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(3)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = guided_calibration(net, scheduler, latents, conditions, 3.0, batch_size=3)
    single = guided_calibration(net, scheduler, latents, conditions, 3.0, batch_size=1)
    n, steps = 3, 3
    assert len(whole.t) == len(single.t) == 2 * n * steps
    # whole: step-major rows [uncond(n); cond(n)] per step; single: trajectory-major, [uncond; cond] per step
    order = [s * 2 * n + half * n + j for j in range(n) for s in range(steps) for half in range(2)]
    assert torch.equal(whole.t[order], single.t) and torch.equal(whole.cond["class_labels"][order],
                                                                 single.cond["class_labels"])
    assert float((whole.x[order] - single.x).abs().max()) < 1e-4          # float rounding of the batch size


def test_a_pipeline_is_conditioned_as_its_kind_or_refused_in_one_line():
    from common.errors import UsageError
    from hf.pipeline import pipeline_conditions
    pipe, cpu = tiny_dit_pipeline(), torch.device("cpu")
    with pytest.raises(UsageError, match="conditioned on class labels"):
        pipeline_conditions(pipe, "DiTTransformer2DModel", ["a horse"], None, True, "", cpu)
    with pytest.raises(UsageError, match="it has no guidance"):
        pipeline_conditions(pipe, "UNet2DModel", None, None, True, "", cpu)


def test_the_command_line_quantizes_a_dit_pipeline_folder_on_class_labels(tmp_path):
    from common.errors import UsageError
    from experiments.diffusers_task import main
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    base = ["--model_dir", str(tmp_path / "dit"), "--steps", "2", "--n_samples", "2", "--outdir", str(tmp_path / "run")]
    with pytest.raises(UsageError, match="takes no --prompt"):
        main(base + ["--prompt", "a horse"])
    with pytest.raises(UsageError, match="needs --class_label"):
        main(base)
    rec = main(base + ["--class_label", "3", "--class_label", "7", "--ptq", "--quant_mode", "dilatequant",
                       "--weight_bit", "4", "--quant_act", "--act_bit", "8", "--cali_n", "2", "--cali_iters", "1",
                       "--distill_batch_size", "2"])
    assert rec["denoiser"] == "DiTTransformer2DModel" and rec["class_labels"] == [3, 7] and rec["guidance"] == 4.0
    assert (tmp_path / "run" / "quantized.pt").is_file()
