"""Toy models and tiny diffusers configs shared by the tests (built from dicts, no download)."""

TINY_CONFIGS = {
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
        guidance_embeds=True),
    "SD3Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "UNet2DConditionModel": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=8,
        use_additional_conditions=False),
    "DiTTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=8),
    "SanaTransformer2DModel": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=8, patch_size=1),
}


def build_tiny(class_name: str, seed: int = 0, device: str = "cpu"):
    import diffusers
    import torch

    torch.manual_seed(seed)
    cls = getattr(diffusers, class_name)
    if device == "meta":
        with torch.device("meta"):
            return cls.from_config(TINY_CONFIGS[class_name])
    return cls.from_config(TINY_CONFIGS[class_name]).eval()


def seeded_batches(model, count: int, first_seed: int) -> list[dict]:
    """``count`` example input batches of ``model`` (``segquant.example_inputs``), batch ``i`` drawn after
    ``torch.manual_seed(first_seed + i)``: the calibration data several test files build the same way."""
    import torch

    import segquant

    batches = []
    for i in range(count):
        torch.manual_seed(first_seed + i)
        batches.append(segquant.example_inputs(model))
    return batches


_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "table"]


def _clip_tokenizer(folder):
    """A CLIP tokenizer over a few words and single letters (written to ``folder``)."""
    import json
    import os

    from transformers import CLIPTokenizer

    clip_dir = os.path.join(folder, "_clip_vocab")
    os.makedirs(clip_dir, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in _WORDS:
        vocab[word + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    with open(os.path.join(clip_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(clip_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(clip_dir, "vocab.json"), os.path.join(clip_dir, "merges.txt"),
                         model_max_length=77)


def _word_tokenizer(bos=False):
    """A word-level fast tokenizer (T5-style; with ``bos`` Gemma-style) over a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<bos>": 3, **{w: i + 4 for i, w in enumerate(_WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=32, **extra), len(vocab)


def _clip(vocab_size, hidden, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, projection_dim=projection or hidden, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(vocab_size, d_model=32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4))


def _vae(latent_channels, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def _finish(pipe, folder):
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()
    pipe.save_pretrained(folder)
    return pipe


def build_tiny_flux_pipeline(folder, seed: int = 0):
    """A complete tiny FluxPipeline built offline (tiny CLIP and T5 text encoders with tokenizers written
    here, tiny VAE, tiny transformer), saved to ``folder`` as a diffusers pipeline folder, in eval mode."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tokenizer = _clip_tokenizer(folder)
    t5_tokenizer, t5_vocab = _word_tokenizer()
    torch.manual_seed(seed)
    clip = _clip(len(clip_tokenizer), 32)
    t5 = _t5(t5_vocab)
    vae = _vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel.from_config({**TINY_CONFIGS["FluxTransformer2DModel"], "in_channels": 16})
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    return _finish(pipe, folder)


def build_tiny_sd3_pipeline(folder, seed: int = 0):
    """A tiny StableDiffusion3Pipeline: two CLIP encoders with projection (8 + 8 = the transformer's pooled
    16), a T5 whose width is the joint attention dim (32 >= 16 + 16 of the CLIP hidden states)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tokenizer = _clip_tokenizer(folder)
    t5_tokenizer, t5_vocab = _word_tokenizer()
    torch.manual_seed(seed)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_config(TINY_CONFIGS["SD3Transformer2DModel"]),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(len(clip_tokenizer), 16, projection=8), tokenizer=clip_tokenizer,
        text_encoder_2=_clip(len(clip_tokenizer), 16, projection=8), tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5(t5_vocab), tokenizer_3=t5_tokenizer)
    return _finish(pipe, folder)


def build_tiny_sdxl_pipeline(folder, seed: int = 0):
    """A tiny StableDiffusionXLPipeline: CLIP (16) + CLIP with projection (16, pooled 32) = the UNet's
    cross-attention dim 32; text_time embedding input 6 x 8 + 32 = 80."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    clip_tokenizer = _clip_tokenizer(folder)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel.from_config(TINY_CONFIGS["UNet2DConditionModel"]),
        scheduler=EulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=_clip(len(clip_tokenizer), 16), tokenizer=clip_tokenizer,
        text_encoder_2=_clip(len(clip_tokenizer), 16, projection=32), tokenizer_2=clip_tokenizer)
    return _finish(pipe, folder)


def build_tiny_pixart_pipeline(folder, seed: int = 0):
    """A tiny PixArtSigmaPipeline: T5 of width 32 (the transformer's caption channels)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer, vocab = _word_tokenizer()
    torch.manual_seed(seed)
    pipe = PixArtSigmaPipeline(
        transformer=PixArtTransformer2DModel.from_config(TINY_CONFIGS["PixArtTransformer2DModel"]),
        scheduler=DPMSolverMultistepScheduler(), vae=_vae(4), text_encoder=_t5(vocab), tokenizer=tokenizer)
    return _finish(pipe, folder)


def build_tiny_sana_pipeline(folder, seed: int = 0):
    """A tiny SanaPipeline: Gemma2 of width 32 (the transformer's caption channels), a tiny DC-AE."""
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer, vocab = _word_tokenizer(bos=True)
    torch.manual_seed(seed)
    gemma = Gemma2Model(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=512, pad_token_id=0, bos_token_id=3, eos_token_id=1))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        downsample_block_type="conv", upsample_block_type="interpolate",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    pipe = SanaPipeline(transformer=SanaTransformer2DModel.from_config(TINY_CONFIGS["SanaTransformer2DModel"]),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=gemma,
                        tokenizer=tokenizer)
    return _finish(pipe, folder)


TINY_PIPELINES = {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline, "sdxl": build_tiny_sdxl_pipeline,
                  "pixart": build_tiny_pixart_pipeline, "sana": build_tiny_sana_pipeline}
"""Family -> builder of a tiny random pipeline saved to a folder (the examples' test models)."""


def tiny_flux_images(pipe, prompt: str = "a photo of a cat", seed: int = 0):
    import torch

    return pipe(prompt, height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images
