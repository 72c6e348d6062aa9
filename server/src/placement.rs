//! Placement, as a pure function: which online peers take which chunks of one put.
//! Candidates (with the room each has left) and wants (a chunk, how many new copies, the
//! peers it must avoid, the stripe it belongs to) in; an assignment or the first
//! shortfall out. No database, no HTTP: the store gathers the inputs and records the
//! result.

use std::collections::{HashMap, HashSet};

use peerstash::{ChunkId, PeerId};

/// A peer that may take chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The peer.
    pub id: PeerId,
    /// Bytes it can still take in this put.
    pub room: u64,
    /// It stores more than its audited holdings have earned: it is offered chunks first.
    pub needs_credit: bool,
}

/// New copies one chunk (or one erasure shard) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The chunk or shard.
    pub chunk: ChunkId,
    /// Its size in bytes.
    pub size: u32,
    /// How many more distinct peers must take it.
    pub copies: usize,
    /// Peers that must not: they hold it already, or a placement for it is pending there.
    pub avoid: HashSet<PeerId>,
    /// The stripe it is a shard of: no two shards of a stripe on one peer.
    pub stripe: Option<usize>,
}

/// Why a put cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// A chunk found fewer distinct peers with room than it needs copies.
    Copies {
        /// The chunk.
        chunk: ChunkId,
        /// Its size.
        size: u32,
        /// Copies it needed.
        need: usize,
        /// Copies that found a peer.
        got: usize,
        /// Candidates it was not told to avoid (with room or not).
        others: usize,
    },
    /// A stripe's shard found no peer holding none of the stripe's other shards.
    Stripe {
        /// Candidates the shard was not told to avoid.
        others: usize,
    },
}

/// The candidates are ranked once per put: those that need credit first, then by most
/// room. Each copy goes to the first distinct candidate in that ranking with room left
/// for it, so a put's chunks go to as few peers as their copies need (one token, one
/// transfer and one confirm per target, not one per chunk), and nobody is filled past
/// its room. Load spreads across puts: the peers a put chose rank lower in the next one,
/// their room shrunk by what they were given. Returns, per candidate index (into
/// `cands`, whose `room` is consumed), the chunks it takes, in `wants` order.
pub fn place(
    cands: &mut [Candidate],
    wants: &[Want],
) -> Result<HashMap<usize, Vec<(ChunkId, u32)>>, Shortfall> {
    let mut assign: HashMap<usize, Vec<(ChunkId, u32)>> = HashMap::new();
    let mut order: Vec<usize> = (0..cands.len()).collect();
    // Stable: equal candidates keep the store's order.
    order.sort_by(|a, b| {
        let (a, b) = (&cands[*a], &cands[*b]);
        b.needs_credit
            .cmp(&a.needs_credit)
            .then(b.room.cmp(&a.room))
    });
    let mut stripe_used: HashMap<usize, HashSet<PeerId>> = HashMap::new();
    for w in wants {
        let mut got = 0;
        for &i in &order {
            if got == w.copies {
                break;
            }
            let c = &mut cands[i];
            let taken = w
                .stripe
                .is_some_and(|g| stripe_used.get(&g).is_some_and(|u| u.contains(&c.id)));
            if c.room < u64::from(w.size) || w.avoid.contains(&c.id) || taken {
                continue;
            }
            c.room -= u64::from(w.size);
            assign.entry(i).or_default().push((w.chunk, w.size));
            if let Some(g) = w.stripe {
                stripe_used.entry(g).or_default().insert(c.id);
            }
            got += 1;
        }
        if got < w.copies {
            let others = cands.iter().filter(|c| !w.avoid.contains(&c.id)).count();
            return Err(match w.stripe {
                Some(_) => Shortfall::Stripe { others },
                None => Shortfall::Copies {
                    chunk: w.chunk,
                    size: w.size,
                    need: w.copies,
                    got,
                    others,
                },
            });
        }
    }
    Ok(assign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(i: u8, room: u64, needs_credit: bool) -> Candidate {
        Candidate {
            id: PeerId(u64::from(i)),
            room,
            needs_credit,
        }
    }

    fn want(i: u8, size: u32, copies: usize, stripe: Option<usize>) -> Want {
        Want {
            chunk: ChunkId([i; 32]),
            size,
            copies,
            avoid: HashSet::new(),
            stripe,
        }
    }

    #[test]
    fn most_room_first_and_those_needing_credit_before_all() {
        let mut c = vec![cand(1, 100, false), cand(2, 500, false), cand(3, 50, true)];
        let a = place(&mut c, &[want(9, 10, 2, None)]).unwrap();
        let mut who: Vec<usize> = a.keys().copied().collect();
        who.sort_unstable();
        assert_eq!(who, vec![1, 2], "the needy peer, then the roomiest");
        assert_eq!((c[0].room, c[1].room, c[2].room), (100, 490, 40));
    }

    #[test]
    fn a_put_goes_to_as_few_peers_as_its_copies_need() {
        let mut c: Vec<Candidate> = (1..=10).map(|i| cand(i, 1_000_000, false)).collect();
        let wants: Vec<Want> = (0..64).map(|i| want(i, 1000, 2, None)).collect();
        let a = place(&mut c, &wants).unwrap();
        assert_eq!(a.len(), 2, "{:?}", a.keys());
        assert!(a.values().all(|list| list.len() == 64));
        // The next put ranks the peers this one filled last.
        let b = place(&mut c, &wants).unwrap();
        assert!(b.keys().all(|i| !a.contains_key(i)), "{:?}", b.keys());
    }

    #[test]
    fn a_peer_out_of_room_passes_the_rest_of_the_put_on() {
        let mut c = vec![
            cand(1, 2500, false),
            cand(2, 1500, false),
            cand(3, 1000, false),
        ];
        let wants: Vec<Want> = (0..3).map(|i| want(i, 1000, 1, None)).collect();
        let a = place(&mut c, &wants).unwrap();
        assert_eq!(a[&0].len(), 2);
        assert_eq!(a[&1].len(), 1);
        assert!(!a.contains_key(&2));
    }

    #[test]
    fn a_shortfall_names_the_chunk_and_the_counts() {
        let mut c = vec![cand(1, 100, false), cand(2, 5, false)];
        let mut w = want(9, 10, 3, None);
        w.avoid.insert(PeerId(1));
        assert_eq!(
            place(&mut c, &[w]),
            Err(Shortfall::Copies {
                chunk: ChunkId([9; 32]),
                size: 10,
                need: 3,
                got: 0,
                others: 1
            })
        );
    }

    proptest! {
        /// Whatever the candidates and wants: copies of a chunk on distinct peers, never
        /// on a peer it must avoid, never past a peer's room, shards of a stripe apart,
        /// and every want met unless a shortfall is reported.
        #[test]
        fn placements_respect_room_distinctness_and_stripes(
            rooms in prop::collection::vec((0u64..5_000, any::<bool>()), 0..8),
            wants in prop::collection::vec(
                (1u32..1_500, 1usize..4, prop::collection::vec(0u8..8, 0..3), prop::option::of(0usize..3)),
                0..12,
            ),
        ) {
            let mut cands: Vec<Candidate> = rooms
                .iter()
                .enumerate()
                .map(|(i, (room, n))| cand(i as u8, *room, *n))
                .collect();
            let before = cands.clone();
            let wants: Vec<Want> = wants
                .iter()
                .enumerate()
                .map(|(i, (size, copies, avoid, stripe))| Want {
                    chunk: ChunkId([i as u8; 32]),
                    size: *size,
                    // A shard is one copy.
                    copies: if stripe.is_some() { 1 } else { *copies },
                    avoid: avoid.iter().map(|a| PeerId(u64::from(*a))).collect(),
                    stripe: *stripe,
                })
                .collect();
            match place(&mut cands, &wants) {
                Ok(assign) => {
                    let mut used = vec![0u64; cands.len()];
                    let mut per_chunk: HashMap<ChunkId, Vec<PeerId>> = HashMap::new();
                    let mut per_stripe: HashMap<usize, Vec<PeerId>> = HashMap::new();
                    for (i, list) in &assign {
                        for (chunk, size) in list {
                            used[*i] += u64::from(*size);
                            per_chunk.entry(*chunk).or_default().push(before[*i].id);
                            let w = wants.iter().find(|w| w.chunk == *chunk).unwrap();
                            prop_assert!(!w.avoid.contains(&before[*i].id));
                            if let Some(g) = w.stripe {
                                per_stripe.entry(g).or_default().push(before[*i].id);
                            }
                        }
                    }
                    for (i, c) in before.iter().enumerate() {
                        prop_assert!(used[i] <= c.room, "past the room of {i}");
                        prop_assert_eq!(cands[i].room, c.room - used[i]);
                    }
                    for w in &wants {
                        let on = per_chunk.get(&w.chunk).cloned().unwrap_or_default();
                        prop_assert_eq!(on.len(), w.copies);
                        let distinct: HashSet<_> = on.iter().collect();
                        prop_assert_eq!(distinct.len(), on.len());
                    }
                    for on in per_stripe.values() {
                        let distinct: HashSet<_> = on.iter().collect();
                        prop_assert_eq!(distinct.len(), on.len(), "two shards of a stripe on one peer");
                    }
                }
                Err(Shortfall::Copies { need, got, .. }) => prop_assert!(got < need),
                Err(Shortfall::Stripe { .. }) => {}
            }
        }
    }
}
