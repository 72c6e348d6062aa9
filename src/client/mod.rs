//! The client side of the coordination server: the peer's state directory ([`home`]) and
//! the typed HTTPS client of the server's API ([`server_api`]).

pub mod home;
pub mod server_api;

pub use home::{parse_size, Home, HomeConfig, HomeError};
pub use server_api::{ClientError, ServerClient};
