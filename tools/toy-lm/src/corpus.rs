//! A deterministic TinyStories-like corpus from a small story grammar. Names and objects
//! recur inside a story (who had what, who came along), so predicting them rewards looking
//! back at the context — the induction a real small LM learns.

use scae::util::rng::SplitMix;

const NAMES: [&str; 12] = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Zoe", "Tim", "Sue", "Leo", "Kim"];
const KINDS: [&str; 6] = ["girl", "boy", "cat", "dog", "bird", "bunny"];
const ADJS: [&str; 6] = ["little", "happy", "kind", "brave", "small", "curious"];
const COLORS: [&str; 6] = ["red", "blue", "green", "yellow", "pink", "big"];
const THINGS: [&str; 8] = ["ball", "kite", "box", "cake", "bear", "stone", "hat", "boat"];
const PLACES: [&str; 8] = ["park", "garden", "forest", "beach", "kitchen", "school", "river", "hill"];
const FEELINGS: [&str; 6] = ["happy", "sad", "tired", "excited", "scared", "proud"];

fn pick<'a>(rng: &mut SplitMix, xs: &[&'a str]) -> &'a str {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

/// One story (a single line).
pub fn story(rng: &mut SplitMix) -> String {
    let a = pick(rng, &NAMES);
    let mut b = pick(rng, &NAMES);
    while b == a {
        b = pick(rng, &NAMES);
    }
    let (kind, adj, color, thing, place, feel) = (
        pick(rng, &KINDS),
        pick(rng, &ADJS),
        pick(rng, &COLORS),
        pick(rng, &THINGS),
        pick(rng, &PLACES),
        pick(rng, &FEELINGS),
    );
    let mut s = format!("Once upon a time there was a {adj} {kind} named {a}. {a} had a {color} {thing}. ");
    match rng.next_u64() % 3 {
        0 => s += &format!("One day {a} went to the {place} with {b}. {b} saw the {color} {thing} and said: can I play with your {thing}? {a} said yes. "),
        1 => s += &format!("One day {a} lost the {color} {thing} in the {place}. {b} helped {a} look for it. When they found the {thing}, {a} said thank you, {b}! "),
        _ => s += &format!("{a} wanted to show the {thing} to {b}. {a} ran to the {place}, but {b} was not there. Then {b} came and {a} gave {b} the {color} {thing}. "),
    }
    s += &format!("{a} and {b} were very {feel}. The end.");
    s
}

/// `n` stories.
pub fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix(seed);
    (0..n).map(|_| story(&mut rng)).collect()
}

/// Split like the `Whitespace` pre-tokenizer: runs of word characters, or runs of other
/// non-space characters.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_word = false;
    for ch in text.chars() {
        if ch.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let w = ch.is_alphanumeric() || ch == '_';
        if !cur.is_empty() && w != cur_word {
            out.push(std::mem::take(&mut cur));
        }
        cur_word = w;
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
