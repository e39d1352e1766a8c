# STEM-full 1B on 24 GB cards, as a torchrun job: the backbone in FSDP shards, each rank
# owning 1/N of the table rows in its host memory with an LFU cache on its card.
#   python train.py config/stem_1b_24gb.py --world_size=8 --dry_run=True       # one rank's plan
#   torchrun --nproc_per_node=8 train.py config/stem_1b_24gb.py
# batch_size is the global micro-batch: each of 8 ranks computes 1 sequence of it.
__file__ = __file__.replace("stem_1b_24gb", "stem_1b")     # stem_1b.py reads its base by its own name
exec(open(__file__).read())
out_dir = "out-stem-1b-24gb"
batch_size = 8
grad_accum_steps = 8        # 8 x 8 x 1024 = 65k tokens per step, as stem_1b.py
table_cache_fraction = 0.05
