# STEM-full 350M (23 STEM layers, the 50k vocabulary) on one 24 GB card: the tables live in
# host memory (36 GiB of fp32 weights and moments, pinned: ~43 GiB host at the peak), the
# device holds the backbone, a small LFU cache and slots for the rows in flight, and
# micro-batches of 4 x 1024 keep the 65k tokens per step of stem_350m.py.
# Check it first: python train.py config/stem_350m_24gb.py --device=cuda --dry_run=True
# (20.2 GiB planned on the device on the stdlib text of data/text; the run re-plans on your
# data and stops before allocating if the card's free memory is short).
exec(open(__file__.replace("stem_350m_24gb", "stem_350m")).read())
out_dir = "out-stem-350m-24gb"
tables = "offload"
table_optimizer = "adamw_catchup"   # lazy, with skipped steps applied on the next read: = dense AdamW
table_cache_fraction = 0.02         # 1,006 hot rows; the transient slots hold the rest of a step's rows
batch_size = 4
grad_accum_steps = 16               # 4 x 16 x 1024 = 65k tokens per step, as stem_350m.py
dtype = "bfloat16"
