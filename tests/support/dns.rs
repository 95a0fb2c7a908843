//! A real authoritative DNS server on loopback, so resolver code is tested against actual
//! UDP/TCP exchanges (timeouts, NXDOMAIN, CNAME chains) instead of a mocked lookup trait.
//!
//! Built on `hickory-server`: its `Catalog` and `InMemoryZoneHandler` produce the responses, so
//! the wire behaviour (AA flag, SOA in the authority section of negative answers, in-zone CNAME
//! chasing) is that of a real authoritative server rather than something hand-rolled here.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

/// An authoritative server for one zone on 127.0.0.1, UDP and TCP on the same port (so a
/// resolver that retries truncated answers over TCP reaches the same data).
///
/// Records can be changed while it serves; each query sees the zone as it was when the query
/// arrived. Dropping it aborts the serving tasks, which close both sockets the next time the
/// runtime runs them.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Held only for its Drop: dropping hickory's `Server` drops its JoinSet, which aborts the
    // UDP and TCP tasks.
    _server: Server<Handler>,
}

impl DnsServer {
    /// Serves zone `origin` (e.g. `"strait.test."`) holding nothing but its SOA, so every
    /// other name in it is NXDOMAIN until set.
    ///
    /// The SOA has TTL 0 and minimum 0, so negative answers carry a negative TTL of 0 and a
    /// caching resolver never keeps an NXDOMAIN across a record change made by the test.
    pub async fn start(origin: &str) -> DnsServer {
        let origin = fqdn(origin);
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone::new(origin.clone())),
            origin,
            answering: AtomicBool::new(true),
            queries: Mutex::new(HashMap::new()),
        });

        let (udp, tcp) = bind_same_port().await;
        let addr = udp.local_addr().expect("udp local addr");
        let mut server = Server::new(Handler(Arc::clone(&shared)));
        server.register_socket(udp);
        // The idle timeout only bounds how long a silent TCP client keeps a connection task
        // alive; it never cuts an exchange in progress.
        server.register_listener(tcp, Duration::from_secs(10), 32);

        DnsServer {
            addr,
            shared,
            _server: server,
        }
    }

    /// Where to point a resolver: 127.0.0.1 and one port serving both UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the A rrset of `name`; an empty `ips` removes it. A CNAME at `name` goes
    /// first, because a name with a CNAME can hold no other data.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        let name = self.shared.in_zone(name);
        let rdata = ips.iter().map(|ip| RData::A(A(*ip))).collect();
        self.shared.zone().set(name, RecordType::A, rdata, ttl);
    }

    /// Replaces the AAAA rrset of `name`; an empty `ips` removes it. Same CNAME rule as
    /// [`DnsServer::set_a`].
    pub fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr], ttl: u32) {
        let name = self.shared.in_zone(name);
        let rdata = ips.iter().map(|ip| RData::AAAA(AAAA(*ip))).collect();
        self.shared.zone().set(name, RecordType::AAAA, rdata, ttl);
    }

    /// Makes `name` an alias of `target`, dropping every other record of `name` (a CNAME must
    /// be alone at its name). When `target` is in the zone the server answers with the whole
    /// chain plus the target's records, as authoritative servers do, so a stub resolver gets
    /// the addresses from one query per record type.
    pub fn set_cname(&self, name: &str, target: &str, ttl: u32) {
        let name = self.shared.in_zone(name);
        assert!(
            name != self.shared.origin,
            "a CNAME cannot sit at the zone apex"
        );
        let rdata = vec![RData::CNAME(CNAME(fqdn(target)))];
        self.shared.zone().set(name, RecordType::CNAME, rdata, ttl);
    }

    /// Deletes every record of `name`, so queries for it get NXDOMAIN (unless names below it
    /// still exist: then it is an empty non-terminal, NOERROR with no answers). The zone's own
    /// SOA stays, since the zone cannot be served without it.
    pub fn remove(&self, name: &str) {
        let name = self.shared.in_zone(name);
        self.shared.zone().remove(name);
    }

    /// `false` makes the server read and count queries but never reply, on UDP and TCP alike:
    /// what a resolver sees from an unreachable or overloaded server is a timeout, not an
    /// error response.
    pub fn set_answering(&self, on: bool) {
        self.shared.answering.store(on, Ordering::SeqCst);
    }

    /// How many queries of any type arrived for `name`, answered or not, over both transports.
    /// Lets a test tell a resolver cache hit from a fresh lookup. Counts are per message: a
    /// dual-stack `lookup_ip` sends two (A and AAAA), and hickory's UDP client resends a query
    /// still unanswered after ~333ms, so only assert exact counts while the server answers.
    pub fn queries(&self, name: &str) -> usize {
        self.query_times(name).len()
    }

    /// When each query for `name` arrived, oldest first: lets a test check refresh intervals.
    pub fn query_times(&self, name: &str) -> Vec<Instant> {
        let key = LowerName::from(fqdn(name));
        let times = self.shared.queries.lock().expect("query log lock");
        times.get(&key).cloned().unwrap_or_default()
    }
}

/// State shared by the test-facing handle and the request handler in the server's tasks.
/// Plain std mutexes suffice: they are only held for short sections with no await inside, so
/// the sync setters work from any test flavour without blocking the runtime.
struct Shared {
    origin: Name,
    zone: Mutex<Zone>,
    answering: AtomicBool,
    queries: Mutex<HashMap<LowerName, Vec<Instant>>>,
}

impl Shared {
    fn zone(&self) -> MutexGuard<'_, Zone> {
        self.zone.lock().expect("zone lock")
    }

    /// Parses `name` and refuses names outside the zone: the server would answer REFUSED for
    /// them, which would make a typo in a test look like a resolver bug. Checked before the
    /// zone lock is taken, so the panic cannot poison it for the serving tasks.
    fn in_zone(&self, name: &str) -> Name {
        let name = fqdn(name);
        assert!(
            self.origin.zone_of(&name),
            "{name} is not in zone {}",
            self.origin
        );
        name
    }
}

/// The zone's records plus the catalog built from them.
///
/// hickory's in-memory zone handler keeps its records behind a tokio lock that can only be
/// written from async code, so instead of editing it in place every change builds a fresh
/// handler and catalog and swaps it in. Test zones are tiny, so the rebuild is cheap, and a
/// query in flight keeps the snapshot it started with.
struct Zone {
    origin: Name,
    records: BTreeMap<RrKey, RecordSet>,
    catalog: Arc<Catalog>,
}

impl Zone {
    fn new(origin: Name) -> Zone {
        let soa = SOA::new(
            origin.prepend_label("ns").expect("ns label"),
            origin
                .prepend_label("hostmaster")
                .expect("hostmaster label"),
            1,
            3600,
            600,
            86400,
            0,
        );
        let mut rrset = RecordSet::with_ttl(origin.clone(), RecordType::SOA, 0);
        rrset.insert(Record::from_rdata(origin.clone(), 0, RData::SOA(soa)), 1);
        let mut records = BTreeMap::new();
        records.insert(RrKey::new(LowerName::new(&origin), RecordType::SOA), rrset);

        let mut zone = Zone {
            origin,
            records,
            catalog: Arc::new(Catalog::new()),
        };
        zone.publish();
        zone
    }

    /// Replaces the `rtype` rrset of `name`, keeping CNAME exclusive at its name (hickory
    /// rejects a zone that mixes them).
    fn set(&mut self, name: Name, rtype: RecordType, rdata: Vec<RData>, ttl: u32) {
        let lower = LowerName::new(&name);
        if rtype == RecordType::CNAME {
            self.records.retain(|key, _| key.name() != &lower);
        } else {
            self.records
                .remove(&RrKey::new(lower.clone(), RecordType::CNAME));
        }

        let key = RrKey::new(lower, rtype);
        if rdata.is_empty() {
            self.records.remove(&key);
        } else {
            let mut rrset = RecordSet::with_ttl(name.clone(), rtype, ttl);
            for data in rdata {
                rrset.insert(Record::from_rdata(name.clone(), ttl, data), 1);
            }
            self.records.insert(key, rrset);
        }
        self.publish();
    }

    fn remove(&mut self, name: Name) {
        let lower = LowerName::new(&name);
        self.records
            .retain(|key, _| key.name() != &lower || key.record_type == RecordType::SOA);
        self.publish();
    }

    fn publish(&mut self) {
        let handler: InMemoryZoneHandler = InMemoryZoneHandler::new(
            self.origin.clone(),
            self.records.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        )
        .expect("zone records are consistent");
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&self.origin), vec![Arc::new(handler)]);
        self.catalog = Arc::new(catalog);
    }
}

/// Counts every query, then either drops it or hands it to the current catalog snapshot.
struct Handler(Arc<Shared>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        {
            let mut times = self.0.queries.lock().expect("query log lock");
            for query in request.queries.queries() {
                times
                    .entry(query.name().clone())
                    .or_default()
                    .push(Instant::now());
            }
        }

        if !self.0.answering.load(Ordering::SeqCst) {
            // Not using `response_handle` means nothing goes on the wire; the returned info
            // only feeds hickory's own logging.
            return ResponseInfo::from(Header {
                metadata: Metadata::response_from_request(&request.metadata),
                counts: HeaderCounts::default(),
            });
        }

        let catalog = Arc::clone(&self.0.zone().catalog);
        catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// Accepts names with or without the trailing dot; every name in this module is absolute.
fn fqdn(name: &str) -> Name {
    let mut parsed =
        Name::from_ascii(name).unwrap_or_else(|err| panic!("bad DNS name {name:?}: {err}"));
    parsed.set_fqdn(true);
    parsed
}

/// Binds UDP on an ephemeral loopback port, then TCP on the same number. That TCP port may
/// be taken by an unrelated socket, so on failure both are dropped and another port is tried.
async fn bind_same_port() -> (UdpSocket, TcpListener) {
    let mut last_err = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind udp on 127.0.0.1");
        let port = udp.local_addr().expect("udp local addr").port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return (udp, tcp),
            Err(err) => last_err = Some(err),
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1: {last_err:?}");
}
