# The dense twin of stem_350m.py: the same backbone and training, SwiGLU FFN everywhere.
exec(open(__file__.replace("dense_350m", "stem_350m")).read())
ffn = "dense"
out_dir = "out-dense-350m"
