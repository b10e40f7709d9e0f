"""Metric math for generative models, computed from features, never from images: FID and rFID
(``fid``), KID (``kid``), Inception Score (``inception_score``), improved precision/recall
(``precision_recall``), CLIP score and caption accuracy (``text_image``), PSNR/SSIM and codebook
usage (``reconstruction``), and ``feature_bank`` to gather features across ranks. Feature
extractors live elsewhere. Every metric is a torchmetrics ``Metric`` whose states are synced
across DDP ranks and whose result does not depend on batch size, batch order or the number of
ranks (order-dependent metrics receive each sample's global index); reference (real-data)
features are given whole to every rank, not accumulated as states.
"""
