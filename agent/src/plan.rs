//! From a validated [`Config`] and what the maps hold now to the map writes
//! that make them hold the configuration — pure, so its guarantees are tested
//! on plain data:
//!
//! - a weight change is exactly one write (the service value);
//! - a new backend list goes to the idle generation slot of its group first,
//!   then the service value switches to it in one write: the kernel never
//!   sees a half-written list;
//! - service and backend ids stay the same across reloads while the service
//!   (its VIP) and the backend stay in the configuration, whatever their order
//!   in the file, so counters keep their meaning;
//! - segments are written before the service flag that makes the kernel look
//!   them up, and removed after it;
//! - a backend id freed by one backend is not given to another while
//!   conntrack entries may still carry it ([`Quarantine`]): the drained
//!   backend's packets would be counted as the new one's;
//! - a service removed from the configuration drains: its map value stays,
//!   with no backend for a new connection (its established ones follow
//!   their conntrack entries), until the agent finds none of its entries
//!   left; then it is deleted.
//!
//! What the rollouts want of a service (its weight, its canary segments on
//! or off) comes beside the configuration as [`Override`]s.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use kanari_common::{
    maps::{
        Backend, BackendSet, Group, MAX_SERVICES, SERVICE_F_CONNECTION_AFFINITY, SERVICE_F_HTTP,
        SERVICE_F_SEGMENTS, SegmentKey, Service, ServiceKey, backend_set_slot,
    },
    wire,
};

use crate::config::{Affinity, Cidr, Config, Protocol};

/// One write to the kernel maps.
#[derive(Clone, Debug, PartialEq)]
pub enum MapOp {
    WriteBackendSet {
        slot: u32,
        set: Box<BackendSet>,
    },
    WriteService {
        key: ServiceKey,
        value: Service,
    },
    DeleteService {
        key: ServiceKey,
    },
    WriteSegment {
        key: SegmentKey,
        prefix_len: u32,
        group: Group,
    },
    DeleteSegment {
        key: SegmentKey,
        prefix_len: u32,
    },
}

/// What the maps hold for one service, as last written.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedService {
    pub name: String,
    pub key: ServiceKey,
    pub value: Service,
    /// The backends of each group in slot order, with their ids.
    pub backends: [Vec<(SocketAddrV4, u32)>; 2],
    /// The generation of each group's live slot.
    pub generation: [u32; 2],
    pub segments: BTreeMap<Cidr, Group>,
    /// Removed from the configuration: no backend for new connections,
    /// deleted once no conntrack entry carries its id.
    pub draining: bool,
}

/// What the maps hold, as last written by [`plan`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    pub services: BTreeMap<SocketAddrV4, AppliedService>,
}

impl Applied {
    fn service_ids(&self) -> BTreeSet<u32> {
        self.services.values().map(|s| s.value.id).collect()
    }

    pub fn backend_ids(&self) -> BTreeMap<(SocketAddrV4, Group, SocketAddrV4), u32> {
        let mut ids = BTreeMap::new();
        for (vip, s) in &self.services {
            for g in [Group::Stable, Group::Canary] {
                for (b, id) in &s.backends[g as usize] {
                    ids.insert((*vip, g, *b), *id);
                }
            }
        }
        ids
    }

    /// The service a VIP belongs to, and the group and id of a backend.
    pub fn service(&self, vip: SocketAddrV4) -> Option<&AppliedService> {
        self.services.get(&vip)
    }
}

/// What a rollout wants of its service's map value, over the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Override {
    /// The canary weight, basis points.
    pub weight: u32,
    /// Whether the canary's segments send it their clients.
    pub canary_segments: bool,
}

/// The writes of a plan, and what the maps hold once they are done.
#[derive(Debug)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub next: Applied,
    /// Quarantined ids given out before they drained, for want of free ones.
    pub reclaimed: Vec<u32>,
}

/// Backend ids no longer configured whose conntrack entries may still
/// carry them: each with when it was freed (agent clock, ms). An id is
/// released once a walk of the table that began after it was freed finds
/// no entry with it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quarantine {
    ids: BTreeMap<u32, u64>,
}

impl Quarantine {
    /// Holds the ids `before` had and `after` does not.
    pub fn hold_freed(&mut self, before: &Applied, after: &Applied, now_ms: u64) {
        let kept: BTreeSet<u32> = after.backend_ids().into_values().collect();
        for id in before.backend_ids().into_values() {
            if !kept.contains(&id) {
                self.ids.entry(id).or_insert(now_ms);
            }
        }
        // An id configured again is in use, not draining.
        self.ids.retain(|id, _| !kept.contains(id));
    }

    /// Holds ids found in conntrack that nothing configured owns (left by a
    /// backend removed while no agent ran).
    pub fn hold(&mut self, ids: impl IntoIterator<Item = u32>, now_ms: u64) {
        for id in ids {
            self.ids.entry(id).or_insert(now_ms);
        }
    }

    /// Releases the ids a walk of the table begun at `walk_started_ms` did
    /// not find in `referenced`; returns them.
    pub fn release_drained(
        &mut self,
        walk_started_ms: u64,
        referenced: &BTreeSet<u32>,
    ) -> Vec<u32> {
        let gone: Vec<u32> = self
            .ids
            .iter()
            .filter(|(id, since)| **since <= walk_started_ms && !referenced.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.ids.remove(id);
        }
        gone
    }

    /// The held ids, the longest held first.
    pub fn held(&self) -> Vec<u32> {
        let mut v: Vec<(u64, u32)> = self.ids.iter().map(|(id, t)| (*t, *id)).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

fn lowest_free(used: &BTreeSet<u32>, limit: u32) -> Option<u32> {
    (0..limit).find(|i| !used.contains(i))
}

fn segment_key(service_id: u32, cidr: Cidr) -> (SegmentKey, u32) {
    (
        SegmentKey::new(service_id, wire::addr(cidr.addr)),
        SegmentKey::SERVICE_BITS + cidr.prefix_len as u32,
    )
}

/// The writes that make the maps hold `config` with the rollouts'
/// `overrides`, and what they will hold then. New backends get ids neither
/// in use nor in `quarantined` (the longest held first), unless none is left.
///
/// Fails only when ids run out, which validation's limits prevent.
pub fn plan(
    applied: &Applied,
    config: &Config,
    overrides: &BTreeMap<String, Override>,
    quarantined: &[u32],
    drained: &BTreeSet<u32>,
) -> Result<Plan, String> {
    let mut ops = Vec::new();
    let mut next = Applied::default();
    let mut reclaimed = Vec::new();
    let mut reclaimable = quarantined.iter().copied();

    // Ids of services and backends that stay keep their ids; the rest are free.
    let wanted_vips: BTreeSet<_> = config.services.iter().map(|s| s.vip).collect();
    // A draining service keeps its id until deleted.
    let mut used_service_ids: BTreeSet<u32> = applied
        .services
        .iter()
        .filter(|(vip, s)| wanted_vips.contains(vip) || !drained.contains(&s.value.id))
        .map(|(_, s)| s.value.id)
        .collect();
    let old_backend_ids = applied.backend_ids();
    let wanted_backends: BTreeSet<_> = config
        .services
        .iter()
        .flat_map(|s| {
            let stable = s.stable.iter().map(move |b| (s.vip, Group::Stable, *b));
            let canary = s.canary.iter().map(move |b| (s.vip, Group::Canary, *b));
            stable.chain(canary)
        })
        .collect();
    let mut used_backend_ids: BTreeSet<u32> = old_backend_ids
        .iter()
        .filter(|(k, _)| wanted_backends.contains(k))
        .map(|(_, id)| *id)
        .collect();
    // Ids this plan frees are draining from now on: not for new backends either.
    let mut taken: BTreeSet<u32> = old_backend_ids
        .values()
        .chain(quarantined)
        .copied()
        .collect();
    debug_assert!(used_service_ids.len() <= applied.service_ids().len());

    for svc in &config.services {
        let old = applied.services.get(&svc.vip);
        let id = match old {
            Some(o) => o.value.id,
            None => {
                let id =
                    lowest_free(&used_service_ids, MAX_SERVICES).ok_or("no free service id")?;
                used_service_ids.insert(id);
                id
            }
        };
        let (addr, port) = (wire::addr(*svc.vip.ip()), wire::port(svc.vip.port()));
        let key = match svc.protocol {
            Protocol::Udp => ServiceKey::udp(addr, port),
            Protocol::Http | Protocol::Tcp => ServiceKey::tcp(addr, port),
        };

        let mut backends: [Vec<(SocketAddrV4, u32)>; 2] = [Vec::new(), Vec::new()];
        let mut generation = old.map_or([0, 0], |o| o.generation);
        let mut slots = [0u32; 2];
        for g in [Group::Stable, Group::Canary] {
            let list = match g {
                Group::Stable => &svc.stable,
                Group::Canary => &svc.canary,
            };
            for b in list {
                let id = match old_backend_ids.get(&(svc.vip, g, *b)) {
                    Some(id) => *id,
                    None => {
                        let id = match lowest_free(&taken, config.max_backends) {
                            Some(id) => id,
                            None => {
                                let id = reclaimable
                                    .find(|id| !used_backend_ids.contains(id))
                                    .ok_or("no free backend id")?;
                                reclaimed.push(id);
                                id
                            }
                        };
                        used_backend_ids.insert(id);
                        taken.insert(id);
                        id
                    }
                };
                backends[g as usize].push((*b, id));
            }
            let unchanged = old.is_some_and(|o| o.backends[g as usize] == backends[g as usize]);
            if !unchanged {
                // A fresh service starts in generation 0; a changed list goes to the idle one.
                if old.is_some() {
                    generation[g as usize] ^= 1;
                }
                let list: Vec<Backend> = backends[g as usize]
                    .iter()
                    .map(|(b, bid)| Backend {
                        addr: wire::addr(*b.ip()),
                        port: wire::port(b.port()),
                        _pad: 0,
                        id: *bid,
                    })
                    .collect();
                let set = BackendSet::of(&list);
                ops.push(MapOp::WriteBackendSet {
                    slot: backend_set_slot(id, g, generation[g as usize]),
                    set: Box::new(set),
                });
            }
            slots[g as usize] = backend_set_slot(id, g, generation[g as usize]);
        }

        let over = overrides.get(&svc.name);
        let segments: BTreeMap<Cidr, Group> = svc
            .segments
            .iter()
            .filter(|r| r.group != Group::Canary || over.is_none_or(|o| o.canary_segments))
            .map(|r| (r.cidr, r.group))
            .collect();
        let old_segments = old.map(|o| &o.segments);
        for (cidr, group) in &segments {
            if old_segments.and_then(|s| s.get(cidr)) != Some(group) {
                let (key, prefix_len) = segment_key(id, *cidr);
                ops.push(MapOp::WriteSegment {
                    key,
                    prefix_len,
                    group: *group,
                });
            }
        }

        let mut flags = 0;
        if svc.affinity == Affinity::Connection {
            flags |= SERVICE_F_CONNECTION_AFFINITY;
        }
        if !segments.is_empty() {
            flags |= SERVICE_F_SEGMENTS;
        }
        if svc.protocol == Protocol::Http {
            flags |= SERVICE_F_HTTP;
        }
        let value = Service {
            id,
            canary_weight: over.map_or(svc.canary_weight, |o| o.weight),
            salt: svc.salt,
            flags,
            backend_sets: slots,
        };
        if old.map(|o| o.value) != Some(value) {
            ops.push(MapOp::WriteService { key, value });
        }

        if let Some(old_segments) = old_segments {
            for cidr in old_segments.keys().filter(|c| !segments.contains_key(c)) {
                let (key, prefix_len) = segment_key(id, *cidr);
                ops.push(MapOp::DeleteSegment { key, prefix_len });
            }
        }

        next.services.insert(
            svc.vip,
            AppliedService {
                name: svc.name.clone(),
                key,
                value,
                backends,
                generation,
                segments,
                draining: false,
            },
        );
    }

    for (vip, old) in &applied.services {
        if wanted_vips.contains(vip) {
            continue;
        }
        for cidr in old.segments.keys() {
            let (key, prefix_len) = segment_key(old.value.id, *cidr);
            ops.push(MapOp::DeleteSegment { key, prefix_len });
        }
        if drained.contains(&old.value.id) {
            ops.push(MapOp::DeleteService { key: old.key });
            continue;
        }
        // Draining: empty sets (new connections find no backend and pass),
        // no segments, weight 0; its connections keep their entries.
        let mut generation = old.generation;
        let mut slots = old.value.backend_sets;
        for g in [Group::Stable, Group::Canary] {
            if !old.backends[g as usize].is_empty() {
                generation[g as usize] ^= 1;
                slots[g as usize] = backend_set_slot(old.value.id, g, generation[g as usize]);
                ops.push(MapOp::WriteBackendSet {
                    slot: slots[g as usize],
                    set: Box::new(BackendSet::EMPTY),
                });
            }
        }
        let value = Service {
            canary_weight: 0,
            flags: old.value.flags & !SERVICE_F_SEGMENTS,
            backend_sets: slots,
            ..old.value
        };
        if value != old.value {
            ops.push(MapOp::WriteService {
                key: old.key,
                value,
            });
        }
        next.services.insert(
            *vip,
            AppliedService {
                // As read back from the maps: no configuration names it.
                name: vip.to_string(),
                key: old.key,
                value,
                backends: [Vec::new(), Vec::new()],
                generation,
                segments: BTreeMap::new(),
                draining: true,
            },
        );
    }
    Ok(Plan {
        ops,
        next,
        reclaimed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(services: &str) -> Config {
        config::parse(
            "t.yaml",
            &format!("interfaces: [{{name: eth0}}]\nservices:\n{services}"),
            &|_| true,
        )
        .unwrap()
    }

    const WEB: &str = "  - name: web\n    vip: 10.0.0.100:80\n    canary_weight: 10\n    stable: {backends: [10.0.2.1:80, 10.0.2.2:80]}\n    canary: {backends: [10.0.3.1:80]}\n";
    const API: &str =
        "  - name: api\n    vip: 10.0.0.101:80\n    stable: {backends: [10.0.2.1:81]}\n";

    /// A plan without overrides or quarantined ids.
    fn p(applied: &Applied, c: &Config) -> (Vec<MapOp>, Applied) {
        let plan = plan(applied, c, &BTreeMap::new(), &[], &BTreeSet::new()).unwrap();
        (plan.ops, plan.next)
    }

    fn first(c: &Config) -> (Vec<MapOp>, Applied) {
        p(&Applied::default(), c)
    }

    #[test]
    fn first_plan_writes_sets_then_the_service() {
        let (ops, applied) = first(&cfg(WEB));
        assert_eq!(ops.len(), 3, "{ops:#?}");
        let MapOp::WriteBackendSet { slot, set } = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!((*slot, set.len), (backend_set_slot(0, Group::Stable, 0), 2));
        assert_eq!(
            set.backends[1].addr,
            wire::addr("10.0.2.2".parse().unwrap())
        );
        assert_eq!(set.backends[1].port, wire::port(80));
        let MapOp::WriteBackendSet { slot, set } = &ops[1] else {
            panic!("{ops:?}")
        };
        assert_eq!((*slot, set.len), (backend_set_slot(0, Group::Canary, 0), 1));
        let MapOp::WriteService { value, .. } = &ops[2] else {
            panic!("{ops:?}")
        };
        assert_eq!(value.canary_weight, 1000);
        assert_eq!(
            value.backend_sets,
            [
                backend_set_slot(0, Group::Stable, 0),
                backend_set_slot(0, Group::Canary, 0)
            ]
        );
        // Backend ids are distinct.
        let ids: BTreeSet<u32> = applied
            .services
            .values()
            .flat_map(|s| s.backends.iter().flatten().map(|b| b.1))
            .collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn a_weight_change_is_one_service_write() {
        let (_, applied) = first(&cfg(WEB));
        let (ops, next) = p(
            &applied,
            &cfg(&WEB.replace("canary_weight: 10", "canary_weight: 100")),
        );
        assert_eq!(ops.len(), 1, "{ops:#?}");
        let MapOp::WriteService { value, .. } = &ops[0] else {
            panic!()
        };
        assert_eq!(value.canary_weight, 10000);
        assert_eq!(
            value.backend_sets,
            applied.services.values().next().unwrap().value.backend_sets
        );
        // And applying the same config again writes nothing.
        let (ops, _) = p(
            &next,
            &cfg(&WEB.replace("canary_weight: 10", "canary_weight: 100")),
        );
        assert!(ops.is_empty(), "{ops:#?}");
    }

    #[test]
    fn a_new_backend_list_goes_to_the_idle_slot_then_the_service_switches() {
        let (_, applied) = first(&cfg(WEB));
        let changed = WEB.replace("[10.0.3.1:80]", "[10.0.3.1:80, 10.0.3.2:80]");
        let (ops, next) = p(&applied, &cfg(&changed));
        assert_eq!(ops.len(), 2, "{ops:#?}");
        let MapOp::WriteBackendSet { slot, set } = &ops[0] else {
            panic!()
        };
        assert_eq!(*slot, backend_set_slot(0, Group::Canary, 1));
        assert_eq!(set.len, 2);
        let MapOp::WriteService { value, .. } = &ops[1] else {
            panic!()
        };
        assert_eq!(value.backend_sets[1], backend_set_slot(0, Group::Canary, 1));
        assert_eq!(value.backend_sets[0], backend_set_slot(0, Group::Stable, 0));
        // The kept backend keeps its id.
        let old = &applied.services.values().next().unwrap().backends[1][0];
        assert_eq!(next.services.values().next().unwrap().backends[1][0], *old);
        // The next change flips back to generation 0.
        let (ops, _) = p(&next, &cfg(WEB));
        let MapOp::WriteBackendSet { slot, .. } = &ops[0] else {
            panic!()
        };
        assert_eq!(*slot, backend_set_slot(0, Group::Canary, 0));
    }

    #[test]
    fn ids_survive_reordering_and_are_reused_after_removal() {
        let both = format!("{WEB}{API}");
        let (_, applied) = first(&cfg(&both));
        let web_id = applied
            .services
            .values()
            .find(|s| s.name == "web")
            .unwrap()
            .value
            .id;
        let api_id = applied
            .services
            .values()
            .find(|s| s.name == "api")
            .unwrap()
            .value
            .id;
        let (ops, reordered) = p(&applied, &cfg(&format!("{API}{WEB}")));
        assert!(ops.is_empty(), "{ops:#?}");
        assert_eq!(reordered, applied);

        // Removed: web drains first (no backend for new connections, its
        // established ones follow conntrack), keeping its id and key.
        let web_key = applied
            .services
            .values()
            .find(|s| s.name == "web")
            .unwrap()
            .key;
        let (ops, draining) = p(&applied, &cfg(API));
        assert!(
            !ops.iter().any(|o| matches!(o, MapOp::DeleteService { .. })),
            "{ops:#?}"
        );
        let MapOp::WriteService { key, value } = ops.last().unwrap() else {
            panic!("{ops:#?}")
        };
        assert_eq!((*key, value.id, value.canary_weight), (web_key, web_id, 0));
        for (g, slot) in value.backend_sets.iter().enumerate() {
            assert!(
                ops.iter().any(|o| matches!(o, MapOp::WriteBackendSet { slot: s, set } if s == slot && set.len == 0)),
                "group {g}: an empty set: {ops:#?}"
            );
        }
        let web = draining
            .services
            .values()
            .find(|s| s.name == "10.0.0.100:80")
            .unwrap();
        assert!(web.draining && web.backends.iter().all(Vec::is_empty));
        // Drained plans nothing more; a new service does not take its id.
        let (ops, still) = p(&draining, &cfg(API));
        assert!(ops.is_empty(), "{ops:#?}");
        let other = WEB
            .replace("10.0.0.100:80", "10.0.0.102:80")
            .replace("name: web", "name: other");
        let (_, with_other) = p(&still, &cfg(&format!("{API}{other}")));
        let id_of = |a: &Applied, name: &str| {
            a.services
                .values()
                .find(|s| s.name == name)
                .unwrap()
                .value
                .id
        };
        assert_ne!(id_of(&with_other, "other"), web_id);
        // Once no conntrack entry carries it: deleted, and its id is free.
        let drained = BTreeSet::from([web_id]);
        let pl = plan(&still, &cfg(API), &BTreeMap::new(), &[], &drained).unwrap();
        assert_eq!(pl.ops, vec![MapOp::DeleteService { key: web_key }]);
        assert_eq!(id_of(&pl.next, "api"), api_id);
        let (_, again) = p(&pl.next, &cfg(&format!("{API}{other}")));
        assert_eq!(id_of(&again, "other"), web_id);
    }

    #[test]
    fn segments_are_written_before_the_flag_and_removed_after_it() {
        let (_, applied) = first(&cfg(WEB));
        let with = format!("{WEB}    segments: [{{cidr: 10.1.5.0/24, group: canary}}]\n");
        let (ops, next) = p(&applied, &cfg(&with));
        assert_eq!(ops.len(), 2, "{ops:#?}");
        let MapOp::WriteSegment {
            key,
            prefix_len,
            group,
        } = &ops[0]
        else {
            panic!()
        };
        assert_eq!((*prefix_len, *group), (32 + 24, Group::Canary));
        assert_eq!(key.addr, wire::addr("10.1.5.0".parse().unwrap()));
        let MapOp::WriteService { value, .. } = &ops[1] else {
            panic!()
        };
        assert_ne!(value.flags & SERVICE_F_SEGMENTS, 0);

        let (ops, _) = p(&next, &cfg(WEB));
        assert!(
            matches!(ops[0], MapOp::WriteService { value, .. } if value.flags & SERVICE_F_SEGMENTS == 0),
            "{ops:#?}"
        );
        assert!(
            matches!(ops[1], MapOp::DeleteSegment { prefix_len: 56, .. }),
            "{ops:#?}"
        );
    }

    #[test]
    fn connection_affinity_sets_its_flag() {
        let (ops, _) = first(&cfg(&WEB.replace(
            "canary_weight: 10\n",
            "canary_weight: 10\n    affinity: connection\n",
        )));
        let Some(MapOp::WriteService { value, .. }) = ops.last() else {
            panic!()
        };
        assert_ne!(value.flags & SERVICE_F_CONNECTION_AFFINITY, 0);
    }

    #[test]
    fn overrides_set_the_weight_and_turn_canary_segments_off() {
        let with = format!(
            "{WEB}    segments: [{{cidr: 10.1.5.0/24, group: canary}}, {{cidr: 10.1.6.0/24, group: stable}}]\n"
        );
        let c = cfg(&with);
        let off = BTreeMap::from([(
            "web".to_string(),
            Override {
                weight: 0,
                canary_segments: false,
            },
        )]);
        let pl = plan(&Applied::default(), &c, &off, &[], &BTreeSet::new()).unwrap();
        let s = pl.next.services.values().next().unwrap();
        assert_eq!(
            s.value.canary_weight, 0,
            "the override, not canary_weight: 10"
        );
        assert_eq!(
            s.segments.values().collect::<Vec<_>>(),
            vec![&Group::Stable],
            "only the stable segment"
        );
    }

    #[test]
    fn quarantined_ids_are_not_given_out_until_none_is_left() {
        let (_, applied) = first(&cfg(WEB));
        let canary_id = applied.services.values().next().unwrap().backends[1][0].1;
        // The canary is replaced: its id is held while its connections drain.
        let replaced = WEB.replace("[10.0.3.1:80]", "[10.0.3.2:80]");
        let (_, next) = p(&applied, &cfg(&replaced));
        let new_id = next.services.values().next().unwrap().backends[1][0].1;
        assert_ne!(new_id, canary_id, "not the id this very plan frees");
        let mut q = Quarantine::default();
        q.hold_freed(&applied, &next, 1000);
        assert_eq!(q.held(), vec![canary_id]);
        // The next reload adds a canary replica: the held id is not given out.
        let more = replaced.replace("[10.0.3.2:80]", "[10.0.3.2:80, 10.0.3.3:80]");
        let pl = plan(
            &next,
            &cfg(&more),
            &BTreeMap::new(),
            &q.held(),
            &BTreeSet::new(),
        )
        .unwrap();
        let added = pl.next.services.values().next().unwrap().backends[1][1].1;
        assert_ne!(added, canary_id, "a fresh id while the old one drains");
        assert!(pl.reclaimed.is_empty());
        // With no other id left, the longest held is reclaimed (and said so).
        let tight = Config {
            max_backends: 4,
            ..cfg(&more)
        };
        let pl = plan(&next, &tight, &BTreeMap::new(), &q.held(), &BTreeSet::new()).unwrap();
        assert_eq!(pl.reclaimed, vec![canary_id]);
        // A walk that began before the id was freed proves nothing; a later one
        // that does not find it releases it.
        assert!(q.release_drained(500, &BTreeSet::new()).is_empty());
        assert!(
            q.release_drained(2000, &BTreeSet::from([canary_id]))
                .is_empty()
        );
        assert_eq!(q.release_drained(2000, &BTreeSet::new()), vec![canary_id]);
        assert!(q.is_empty());
    }
}
