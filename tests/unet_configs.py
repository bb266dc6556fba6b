"""Tiny diffusers UNet configs with every IF feature switched on (shared by tests)."""

TINY_IF_I = dict(
    sample_size=16, in_channels=3, out_channels=6,
    block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    layers_per_block=1, attention_head_dim=16, cross_attention_dim=32,
    encoder_hid_dim=48, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=4,
    act_fn="gelu", norm_num_groups=8, resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm", only_cross_attention=False,
)

# Stage II: three resolutions, class_embed_type "timestep" (augmentation level),
# skip_time_act, time_embedding_act_fn and non-unit output scale factors.
TINY_IF_II = dict(
    sample_size=32, in_channels=6, out_channels=6,
    block_out_channels=[16, 32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    layers_per_block=[1, 1, 2], attention_head_dim=16, cross_attention_dim=32,
    encoder_hid_dim=48, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=4,
    class_embed_type="timestep", time_embedding_dim=64, time_embedding_act_fn="gelu",
    act_fn="gelu", norm_num_groups=8, resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True, resnet_out_scale_factor=1.4142271248762552,
    mid_block_scale_factor=1.4142271248762552,
    cross_attention_norm="group_norm", only_cross_attention=False,
)

TEXT_LEN = 7
TEXT_DIM = 48
