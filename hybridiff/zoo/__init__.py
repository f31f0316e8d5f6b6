"""hybridiff's own small trained models: handwritten digits drawn from text prompts.

No real checkpoint can be downloaded here, so the built-in ``digits-sdxl`` (a UNet with SDXL's
conditioning) and ``digits-sd3`` (an MMDiT trained with flow matching) are trained by
``python -m hybridiff.zoo.train`` on scikit-learn's bundled digits and ship as diffusers
folders under ``hybridiff/models/weights``, beside a small digit classifier that scores them.
"""
