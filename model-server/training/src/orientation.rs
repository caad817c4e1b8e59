//! Slot orientation of ground-truth reward-model pairs, drawn exactly as the official code does:
//! one `random.Random(seed).random()` per row, in row order; `u < 0.5` puts the human-chosen
//! text in slot c (label 1), otherwise the texts are swapped (label 0). Implemented with
//! Python's Mersenne Twister so the orientation of every row matches the official runs and is
//! identical across all runs of a study.

/// Python's `random.Random` (MT19937 seeded with `init_by_array`), as far as `random()` goes.
#[derive(Debug, Clone)]
pub struct PythonRandom {
    state: [u32; 624],
    index: usize,
}

impl PythonRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // Python splits abs(seed) into 32-bit words, least significant first.
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut rng = Self {
            state: [0; 624],
            index: 624,
        };
        rng.init_genrand(19650218);
        let n = 624usize;
        let (mut i, mut j) = (1usize, 0usize);
        let mut k = n.max(key.len());
        while k > 0 {
            let prev = rng.state[i - 1] ^ (rng.state[i - 1] >> 30);
            rng.state[i] = (rng.state[i] ^ prev.wrapping_mul(1664525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= n {
                rng.state[0] = rng.state[n - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
            k -= 1;
        }
        k = n - 1;
        while k > 0 {
            let prev = rng.state[i - 1] ^ (rng.state[i - 1] >> 30);
            rng.state[i] = (rng.state[i] ^ prev.wrapping_mul(1566083941)).wrapping_sub(i as u32);
            i += 1;
            if i >= n {
                rng.state[0] = rng.state[n - 1];
                i = 1;
            }
            k -= 1;
        }
        rng.state[0] = 0x8000_0000;
        rng
    }

    fn init_genrand(&mut self, seed: u32) {
        self.state[0] = seed;
        for i in 1..624 {
            let prev = self.state[i - 1] ^ (self.state[i - 1] >> 30);
            self.state[i] = 1812433253u32.wrapping_mul(prev).wrapping_add(i as u32);
        }
        self.index = 624;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    next ^= 0x9908_b0df;
                }
                self.state[i] = next;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.random()`: a double in [0, 1) with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)
    }
}

/// For each of `rows` ground-truth pairs: `true` when the human-chosen text goes in slot c
/// (label 1), `false` when the pair is swapped (label 0).
pub fn chosen_in_slot_c(seed: u64, rows: usize) -> Vec<bool> {
    let mut rng = PythonRandom::new(seed);
    (0..rows).map(|_| rng.random() < 0.5).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cpython_random() {
        // Values printed by CPython 3.11: random.Random(seed).random(), twice.
        let cases: [(u64, [f64; 2]); 3] = [
            (0, [0.8444218515250481, 0.7579544029403025]),
            (42, [0.6394267984578837, 0.025010755222666936]),
            ((1 << 40) + 7, [0.6137037779936511, 0.8149162973309487]),
        ];
        for (seed, expected) in cases {
            let mut rng = PythonRandom::new(seed);
            for value in expected {
                assert_eq!(rng.random(), value, "seed {seed}");
            }
        }
    }

    #[test]
    fn orientation_is_fixed_per_seed_and_balanced() {
        let a = chosen_in_slot_c(0, 4000);
        assert_eq!(a, chosen_in_slot_c(0, 4000));
        assert!(!a[0] && !a[1] && a[2]); // 0.844, 0.758, 0.421
        let ones = a.iter().filter(|x| **x).count();
        assert!((1800..2200).contains(&ones), "{ones}");
    }
}
