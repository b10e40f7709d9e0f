"""The pieces of a generative evaluation, used by ``callbacks.generative_metrics`` (its Lightning
hooks and wiring) and the entry points:

* ``protocol``: what a model accepts (``generates``, ``reconstructs`` by its capabilities,
  ``check_sampling``), the protocol dict of a result, the callback's option checks;
* ``generation``: conditions of the generated items, chunk sharding over ranks and seeding;
* ``measure``: the synced metrics of a set of images, updated chunk by chunk over the ranks;
* ``tools``: the feature extractor and evaluators (Inception, shapes oracle, CLIP);
* ``references``: reference features of real images, cached on disk;
* ``reconstruction``: reconstructions (rFID, PSNR, SSIM) and the real-image floor.

The protocol (docs/architecture.md, "The evaluation protocol"):

* **Conditions.** Item i of the ``num_samples`` generated images gets the i-th prompt of the
  datamodule's ``sample_prompts`` (val-split captions) for a text model, label ``i mod K`` for a
  label model, nothing for an unconditional one.
* **Sharding with no duplicates and no padding.** Items are cut into chunks of ``batch_size``;
  chunk c is drawn by rank ``c mod W`` from a generator seeded from (seed, purpose, c). Every
  item is drawn exactly once, and an item's image does not depend on the number of ranks, so a
  DDP run gives the single-process numbers (a test checks this with 2 gloo processes). The
  synced sample count is checked against ``num_samples``.
* **Synced states.** Every metric is a torchmetrics metric (``genlab.metrics``) whose states are
  synced across ranks; ``compute()`` runs on every rank; nothing collective runs on rank 0 only.
* **Features.** ``features: auto`` uses torch-fidelity's Inception-v3 when its weights are on
  disk (``inception_weights`` or torch-fidelity's cache) and otherwise says so in a warning and
  uses the offline evaluator named by ``fallback`` (the shapes oracle, or CLIP image
  embeddings). The shapes oracle also parses images for caption accuracy whenever the prompts
  are shapes captions; CLIP (when configured) gives the CLIP score of text models. Evaluator
  checkpoints are found or built once (``genlab.metrics.evaluators``).
* **Reference statistics** of ``num_reference`` real images of ``reference_split`` are cached
  on disk, keyed by the dataset description and the extractor version
  (``genlab.evaluation.references``).
* **Reconstructions.** A model with ``reconstruct(images)`` (the first stages: VAE, VQ-GAN,
  dVAE) also gets the result ``reconstructed``: its reconstructions of items 0..n-1 of
  ``reference_split`` (n = ``num_samples`` capped at the split's size), the same items as the
  reference features, measured as if generated. FID against the reference is then rFID, the
  reconstruction FID (Esser et al. 2021, Table 2; Rombach et al. 2022, Table 8), with KID and
  precision/recall beside it; caption accuracy compares the reconstructions with their own
  captions (shapes data); PSNR and SSIM compare them with the originals
  (``genlab.metrics.reconstruction``). No Inception Score: it rates diversity and class
  confidence, not fidelity to an input. The chunks are sharded as above; ``reconstruct`` is
  deterministic, so no seed is involved. A model that reconstructs but does not generate (VQ-GAN,
  dVAE) gets only this result; the VAE gets both.
* Every result carries its protocol: extractor and version, sample and reference counts,
  sampler, steps, guidance scale, seed, weights (EMA or raw), evaluator versions. Results go to
  the loggers as ``<stage>/<metric>`` (``<stage>/w<scale>/<metric>`` in a guidance sweep,
  ``<stage>/recon/<metric>`` for reconstructions, ``<stage>/real_<split>/<metric>`` for the real
  floor) and, with their protocols, to ``<output_dir>/metrics/<stage>_step<step>.json``.
"""
