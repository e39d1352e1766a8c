# About 1B active parameters on one 80 GB GPU: the tables (23 layers of d_ff 5632) are
# offloaded to pinned host memory, which needs a host with room for their weights and both
# moments (see the plan: python train.py config/stem_1b.py --device=cuda --dry_run=True).
exec(open(__file__.replace("stem_1b", "stem_350m")).read())
out_dir = "out-stem-1b"
n_layer = 24
n_head = 16
n_embd = 2048
d_ff = 5632
tables = "offload"
table_optimizer = "adamw_catchup"
table_cache_fraction = 0.02
batch_size = 4
grad_accum_steps = 16       # 4 x 16 x 1024 = 65k tokens per step, as stem_350m.py
learning_rate = 2e-4
