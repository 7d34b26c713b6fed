"""Plain-PyTorch reference implementations of the suite's operators.

They are the executable specification of what each kernel computes and the oracles the tests compare
against; they favour clarity over speed.
"""
