"""`sparvar bench profile`'s kernel categories, on kernel names an H100 profile recorded
(benchmarks/hopper_2026-12-06/profile_fp8.json)."""

import pytest

from sparvar.bench.profile import category


@pytest.mark.parametrize("name,kind", [
    ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    # the VAE's convolutions: cuDNN's name, no attention in them
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_"
     "execute_segment_k_off_kernel__5x_cudnn", "conv"),
    ("_sparse_attention_kernel", "attention"),
    ("_colsum_kernel", "attention"),
    ("_quantize_rows_kernel", "fp8 quantise"),
    ("_add_norm_kernel", "norm"),
    ("_qkv_heads_kernel", "elementwise/other"),
    ("Memcpy DtoH (Device -> Pageable)", "copy"),
])
def test_kernels_fall_into_their_category(name, kind):
    assert category(name) == kind
