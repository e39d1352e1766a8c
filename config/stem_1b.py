# About 1B active parameters for a single large GPU (tables resident: ~80 GB at full STEM;
# use stem_layers = "third" or offloaded tables on smaller cards).
exec(open(__file__.replace("stem_1b", "stem_350m")).read())
out_dir = "out-stem-1b"
n_layer = 24
n_head = 16
n_embd = 2048
d_ff = 5632
batch_size = 8
grad_accum_steps = 8
learning_rate = 2e-4
