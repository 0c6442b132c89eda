"""Text-to-image PEFT benchmark: fine-tune a Stable Diffusion UNet with peftvision, FID.

data.py        image–caption records (captions.csv folders such as BUSI, or a generated demo set)
components.py  UNet / VAE / text encoder / tokenizer / scheduler: Hub id, local DIR, or `tiny`
train.py       noise-prediction MSE with frozen VAE and text encoder
sample.py      StableDiffusionPipeline from the components (safety checker off)
fid.py         torchmetrics FID: InceptionV3, or fixed random features offline
run.py         one run end to end -> <out>/<run>/result.json (the classification format)
"""
