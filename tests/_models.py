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
