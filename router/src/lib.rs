//! Where does an endpoint id go? The router answers that and nothing else: it owns the
//! [`EndpointId`] newtype, the [`Route`] each id maps to, and the [`RoutingTable`] the proxy reads
//! on every connection. Lookups never do I/O; sources (the config file, later Kubernetes) replace
//! the table's contents while readers keep going.

mod id;
mod table;

pub use id::{EndpointId, InvalidEndpointId};
pub use table::{BackendSpec, EndpointConfig, Route, RouteError, RoutingTable, TableDiff};
