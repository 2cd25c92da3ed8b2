"""Regenerate pipelines/data/stories.txt: 400 one-line toy stories from a tiny grammar
(recurring names and objects). Deterministic; the output is committed, so the pipeline never
needs Python. Usage: python pipelines/data/make_stories.py"""
import os
import random

random.seed(7)
names = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Zoe"]
things = ["red ball", "small kite", "blue box", "big cake", "soft bear", "shiny stone", "green hat", "old map"]
places = ["park", "garden", "forest", "beach", "kitchen", "school", "river", "hill"]
feel = ["happy", "sad", "tired", "excited", "scared", "proud"]
lines = []
for i in range(400):
    a, b = random.sample(names, 2)
    t, p, f = random.choice(things), random.choice(places), random.choice(feel)
    lines.append(random.choice([
        f"Once upon a time, {a} found a {t} in the {p}. {a} showed the {t} to {b}. {b} was {f}. They played with the {t} all day.",
        f"{a} and {b} went to the {p}. {a} lost a {t}. {b} helped {a} look for it. When they found the {t}, {a} said thank you to {b}.",
        f"One day {a} wanted a {t}. {a} asked {b} for help. {b} gave {a} the {t}, and {a} felt {f}. The end.",
        f"In the {p} there was a {t}. {a} saw it first and told {b}. {b} was {f} and ran to the {p} to see the {t}.",
    ]))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stories.txt"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
