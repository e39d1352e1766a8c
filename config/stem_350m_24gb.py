# STEM-full 350M (23 STEM layers, the 50k vocabulary) on one 24 GB card: the tables live in
# pinned host memory (weights and both moments), the device holds the backbone, a small LFU
# cache and slots for the rows of a step in flight, and micro-batches of 2 x 1024 keep the
# 65k tokens per step of stem_350m.py.
# Check it first: python train.py config/stem_350m_24gb.py --device=cuda --dry_run=True
# (python cards.py for every recipe); the run re-plans on your data and stops before
# allocating if the card's free memory is short.
exec(open(__file__.replace("stem_350m_24gb", "stem_350m")).read())
out_dir = "out-stem-350m-24gb"
tables = "offload"
table_optimizer = "adamw_catchup"   # lazy, with skipped steps applied on the next read: = dense AdamW
table_cache_fraction = 0.01         # the hottest rows; the transient slots hold the rest of a step's
batch_size = 2
grad_accum_steps = 32               # 2 x 32 x 1024 = 65k tokens per step, as stem_350m.py
dtype = "bfloat16"
