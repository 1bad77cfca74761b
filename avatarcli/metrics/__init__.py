"""Metric functions: image (PSNR, SSIM), LPIPS, identity embeddings (CSIM). ``stages.eval`` runs them."""
