"""Full-size denoiser configs as published with each model (config.json of the transformer/unet
folder), written out here so that tests need no download. Built on the ``meta`` device only."""

FLUX_1_DEV = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}

SD3_5_LARGE = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
}

SD3_5_MEDIUM = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64, "caption_projection_dim": 1536,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "in_channels": 16,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "sample_size": 128,
}

SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

FLUX_1_SCHNELL = dict(FLUX_1_DEV, guidance_embeds=False)

PIXART_SIGMA = {'_class_name': 'PixArtTransformer2DModel',
 'activation_fn': 'gelu-approximate',
 'attention_bias': True,
 'attention_head_dim': 72,
 'attention_type': 'default',
 'caption_channels': 4096,
 'cross_attention_dim': 1152,
 'dropout': 0.0,
 'in_channels': 4,
 'interpolation_scale': 2,
 'norm_elementwise_affine': False,
 'norm_eps': 1e-06,
 'norm_num_groups': 32,
 'norm_type': 'ada_norm_single',
 'num_attention_heads': 16,
 'num_embeds_ada_norm': 1000,
 'num_layers': 28,
 'out_channels': 8,
 'patch_size': 2,
 'sample_size': 128,
 'upcast_attention': False,
 'use_additional_conditions': False}

SANA_1600M = {'_class_name': 'SanaTransformer2DModel',
 'attention_bias': False,
 'attention_head_dim': 32,
 'caption_channels': 2304,
 'cross_attention_dim': 2240,
 'cross_attention_head_dim': 112,
 'dropout': 0.0,
 'in_channels': 32,
 'interpolation_scale': None,
 'mlp_ratio': 2.5,
 'norm_elementwise_affine': False,
 'norm_eps': 1e-06,
 'num_attention_heads': 70,
 'num_cross_attention_heads': 20,
 'num_layers': 20,
 'out_channels': 32,
 'patch_size': 1,
 'sample_size': 32}

FULL_CONFIGS = {"flux.1-dev": FLUX_1_DEV, "flux.1-schnell": FLUX_1_SCHNELL, "sd3.5-large": SD3_5_LARGE,
                "sd3.5-medium": SD3_5_MEDIUM, "sdxl-base": SDXL_BASE_UNET, "pixart-sigma": PIXART_SIGMA,
                "sana-1600m": SANA_1600M}
