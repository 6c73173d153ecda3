"""hf_distill"""
