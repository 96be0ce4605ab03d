"""The `tsgpu` tooling: build model archives, find Java, run a stock TorchServe, the demo.

Nothing here is imported by the handlers at serving time: archives are self-contained.
"""
