//! One connection to the store's database, SQLite or PostgreSQL, behind the few calls the
//! store makes: execute, query one row or many, cached statements and transactions.
//!
//! The store writes its SQL once, in the dialect both databases accept (`?N` parameters,
//! `ON CONFLICT … DO NOTHING/UPDATE`, `RETURNING`, `CASE` instead of SQLite's two-argument
//! `MAX`). Values cross as [`Value`]s, typed loosely as in SQLite: an integer binds to
//! whatever integer, boolean or float column PostgreSQL expects, and a column reads back
//! as any Rust type its value converts to without loss. So one statement text serves both
//! backends, and only the schema and a few SQLite-only tunings are written twice.
//!
//! Transactions on PostgreSQL take one advisory lock first, so write transactions run one
//! at a time across every instance, exactly as SQLite's write lock makes them: the store's
//! read-then-write checks (quotas, the transaction-id mark, invites) stay atomic without
//! per-statement retry loops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;

use bytes::BytesMut;
use postgres::types::{FromSql, IsNull, ToSql, Type};

/// The advisory lock key every PostgreSQL transaction of the store takes ("peerstas").
const PG_WRITE_LOCK: i64 = 0x7065_6572_7374_6173;
/// How long a connection to PostgreSQL may take, unless the URL says
/// (`?connect_timeout=SECONDS`).
const PG_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Idle time before TCP keepalives probe a PostgreSQL connection.
const PG_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Statements kept prepared per connection (the store has about 200).
const STATEMENT_CACHE: usize = 512;

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite refused or failed.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or failed (or the connection broke).
    #[error("postgres: {}", with_cause(.0))]
    Postgres(#[from] postgres::Error),
    /// A query that must return a row returned none.
    #[error("query returned no rows")]
    NoRows,
    /// A column's value does not convert to the Rust type asked for.
    #[error("column {index}: {message}")]
    Column {
        /// The column's position.
        index: usize,
        /// What did not fit.
        message: String,
    },
    /// A failure outside SQL (a log sync, randomness).
    #[error("{0}")]
    Other(String),
}

/// A PostgreSQL error with what caused it (its own message names only the step).
fn with_cause(e: &postgres::Error) -> String {
    match (e.as_db_error(), StdError::source(e)) {
        (Some(db), _) => db.to_string(),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// The database's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `.optional()` on a single-row query: no row becomes `None`.
pub trait OptionalExtension<T> {
    /// `Ok(None)` for [`Error::NoRows`], the value or error otherwise.
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A value as it crosses to or from either database.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An integer (also a boolean: 0 or 1).
    Int(i64),
    /// A float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

/// A Rust value that binds as a statement parameter.
pub trait Param {
    /// The value to bind.
    fn value(&self) -> Value<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn value(&self) -> Value<'_> {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_param!(i64, i32, i16, u32, u16, u8, usize);

impl Param for bool {
    fn value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}
impl Param for f64 {
    fn value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}
impl Param for str {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl Param for String {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl Param for [u8] {
    fn value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl Param for Vec<u8> {
    fn value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl<const N: usize> Param for [u8; N] {
    fn value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}
impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}

/// Statement parameters: `params![a, b]`, `[]` or a slice of [`Param`]s.
pub trait Params {
    /// The parameters, in order.
    fn values(&self) -> Vec<Value<'_>>;
}

impl<T: Param + ?Sized> Params for &[&T] {
    fn values(&self) -> Vec<Value<'_>> {
        self.iter().map(|p| p.value()).collect()
    }
}
impl Params for Vec<Value<'_>> {
    fn values(&self) -> Vec<Value<'_>> {
        self.clone()
    }
}
impl<T: Param, const N: usize> Params for [T; N] {
    fn values(&self) -> Vec<Value<'_>> {
        self.iter().map(|p| p.value()).collect()
    }
}

/// Statement parameters from a list of expressions, as rusqlite's `params!`.
#[macro_export]
macro_rules! db_params {
    () => { &[] as &[&dyn $crate::store::db::Param] };
    ($($x:expr),+ $(,)?) => { &[$(&$x as &dyn $crate::store::db::Param),+] as &[&dyn $crate::store::db::Param] };
}
pub use crate::db_params as params;

/// A Rust type a column's value converts to.
pub trait FromValue: Sized {
    /// The conversion, or why not.
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String>;
}

fn mismatch<T>(v: Value<'_>, want: &str) -> std::result::Result<T, String> {
    Err(format!("{v:?} is not {want}"))
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(i).map_err(|_| format!("{i} out of range")),
                    v => mismatch(v, "an integer"),
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, u64, u32, u16, u8, usize);

impl FromValue for bool {
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
        match v {
            Value::Int(i) => Ok(i != 0),
            v => mismatch(v, "a boolean"),
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
        match v {
            Value::Real(f) => Ok(f),
            Value::Int(i) => Ok(i as f64),
            v => mismatch(v, "a number"),
        }
    }
}
impl FromValue for String {
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.to_string()),
            v => mismatch(v, "text"),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.to_vec()),
            v => mismatch(v, "bytes"),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: Value<'_>) -> std::result::Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A column position (rusqlite's `RowIndex`, positions only).
pub trait ColumnIndex {
    /// The position.
    fn position(self) -> usize;
}
impl ColumnIndex for usize {
    fn position(self) -> usize {
        self
    }
}

/// One result row.
pub struct Row<'a>(RowInner<'a>);

enum RowInner<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a postgres::Row),
}

impl Row<'_> {
    /// Column `i` as a `T`.
    pub fn get<I: ColumnIndex, T: FromValue>(&self, i: I) -> Result<T> {
        let index = i.position();
        let column = |message: String| Error::Column { index, message };
        match &self.0 {
            RowInner::Sqlite(r) => {
                let v = match r.get_ref(index)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                    rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::Text(std::str::from_utf8(t).map_err(|e| column(e.to_string()))?)
                    }
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b),
                };
                T::from_value(v).map_err(column)
            }
            RowInner::Postgres(r) => {
                let Loose(v) = r.try_get::<_, Loose<'_>>(index)?;
                T::from_value(v).map_err(column)
            }
        }
    }
}

/// A PostgreSQL column read as a [`Value`], whatever its integer, float or text type.
struct Loose<'a>(Value<'a>);

impl<'a> FromSql<'a> for Loose<'a> {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let v = match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::NUMERIC => numeric(raw)?,
            Type::BYTEA => Value::Blob(raw),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Value::Text(std::str::from_utf8(raw)?)
            }
            ref other => return Err(format!("unexpected column type {other}").into()),
        };
        Ok(Loose(v))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Loose(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A NUMERIC in PostgreSQL's binary form (what `SUM` of integers returns): an integer
/// when it has no fraction and fits, a float otherwise.
fn numeric(raw: &[u8]) -> Result<Value<'static>, Box<dyn StdError + Sync + Send>> {
    let word = |i: usize| -> Result<u16, Box<dyn StdError + Sync + Send>> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "short NUMERIC".into())
    };
    let (ndigits, weight, sign, scale) = (word(0)?, word(1)? as i16, word(2)?, word(3)?);
    if sign == 0xC000 {
        return Ok(Value::Real(f64::NAN));
    }
    let (mut int, mut float, mut whole) = (0i128, 0f64, true);
    for i in 0..ndigits as usize {
        let digit = word(4 + i)?;
        let power = i32::from(weight) - i as i32;
        float += f64::from(digit) * 10000f64.powi(power);
        if (0..10).contains(&power) {
            int = int.saturating_add(i128::from(digit) * 10000i128.pow(power as u32));
        } else if digit != 0 {
            whole = false;
        }
    }
    let negative = sign == 0x4000;
    if whole && scale == 0 {
        let int = if negative { -int } else { int };
        if let Ok(i) = i64::try_from(int) {
            return Ok(Value::Int(i));
        }
    }
    Ok(Value::Real(if negative { -float } else { float }))
}

/// A [`Value`] bound to a PostgreSQL parameter of whatever type the statement gives it.
#[derive(Debug)]
struct Bind<'a>(Value<'a>);

impl ToSql for Bind<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match (self.0, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(i)?.to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (i != 0).to_sql(ty, out),
            (Value::Int(i), &Type::FLOAT8) => (i as f64).to_sql(ty, out),
            (Value::Real(f), &Type::FLOAT8) => f.to_sql(ty, out),
            (Value::Real(f), &Type::FLOAT4) => (f as f32).to_sql(ty, out),
            (Value::Text(s), _) => s.to_sql(ty, out),
            (Value::Blob(b), &Type::BYTEA) => b.to_sql(ty, out),
            (v, ty) => Err(format!("cannot bind {v:?} as {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl rusqlite::ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Real(f) => ValueRef::Real(f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Which database a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite, a file.
    Sqlite,
    /// PostgreSQL, a server.
    Postgres,
}

/// A connection to the store's database.
pub struct Db(Backend);

enum Backend {
    Sqlite(rusqlite::Connection),
    // A RefCell so that every call takes `&self` on both backends, as rusqlite's do (a
    // statement runs to completion inside each call, so borrows never overlap).
    Postgres(Box<RefCell<PgConn>>),
}

struct PgConn {
    /// Always `Some` but in `Drop`.
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// Where to connect again when the connection is lost (the server restarted, a
    /// network cut): the call that found it lost failed, the next ones go on.
    url: String,
}

impl PgConn {
    fn connect(url: &str) -> Result<PgConn> {
        let mut config: postgres::Config = url.parse()?;
        // An unreachable database fails the start (or the request) instead of hanging it,
        // and a connection whose server vanished is noticed within a minute or so.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        config.keepalives_idle(PG_KEEPALIVE_IDLE);
        let mut client = config.connect(postgres::NoTls)?;
        // Not "relation already exists, skipping" at every start.
        client.batch_execute("SET client_min_messages = warning")?;
        Ok(PgConn {
            client: Some(client),
            statements: HashMap::new(),
            url: url.to_string(),
        })
    }

    /// The client, connected again first if the connection was lost.
    fn client(&mut self) -> Result<&mut postgres::Client> {
        if self.c().is_closed() {
            *self = PgConn::connect(&self.url)?;
        }
        Ok(self.c())
    }

    fn c(&mut self) -> &mut postgres::Client {
        self.client.as_mut().expect("connected until dropped")
    }

    /// The statement for `sql` (`?N` rewritten as `$N`), prepared once per connection.
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        self.client()?;
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        let s = self.c().prepare(&dollar_params(sql))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // The client closes its connection by blocking on a runtime of its own, which
        // tokio forbids on a thread that drives tasks (a server stopping drops its state
        // there): close it on a thread of its own.
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::spawn(move || drop(client)).join();
            } else {
                drop(client);
            }
        }
    }
}

/// `?N` (and bare `?`, numbered in order) as PostgreSQL's `$N`, outside quoted text.
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let (mut quoted, mut next) = (false, 1);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                out.push('$');
                if chars.peek().is_some_and(char::is_ascii_digit) {
                    while let Some(d) = chars.next_if(char::is_ascii_digit) {
                        out.push(d);
                    }
                } else {
                    out.push_str(&next.to_string());
                    next += 1;
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn binds<'a>(values: &'a [Value<'a>]) -> Vec<Bind<'a>> {
    values.iter().map(|v| Bind(*v)).collect()
}

/// The parameters as the PostgreSQL client takes them.
fn pg_refs<'a>(binds: &'a [Bind<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    binds.iter().map(|b| b as &(dyn ToSql + Sync)).collect()
}

impl Db {
    /// A SQLite connection.
    pub fn sqlite(conn: rusqlite::Connection) -> Db {
        // Every call looks its statement up here (none is held across calls), so the
        // cache holds all the store's statements, not rusqlite's default 16.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Db(Backend::Sqlite(conn))
    }

    /// A PostgreSQL connection to `url` (`postgres://user[:password]@host[:port]/db`).
    pub fn postgres(url: &str) -> Result<Db> {
        Ok(Db(Backend::Postgres(Box::new(RefCell::new(
            PgConn::connect(url)?,
        )))))
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        match self.0 {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The SQLite connection, for its own settings (pragmas, checkpoints); `None` on
    /// PostgreSQL.
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.0 {
            Backend::Sqlite(c) => Some(c),
            Backend::Postgres(_) => None,
        }
    }

    /// Whether commits wait for the disk (the default) or only for the database's log
    /// in memory: SQLite's `synchronous` FULL or NORMAL (atomic and durable against a
    /// killed server, not a power cut); PostgreSQL's `synchronous_commit` on or off
    /// (atomic; a crash of the database may lose the last commits, never half of one).
    pub fn wait_for_disk(&self, wait: bool) -> Result<()> {
        match &self.0 {
            Backend::Sqlite(c) => {
                c.pragma_update(None, "synchronous", if wait { "FULL" } else { "NORMAL" })?
            }
            Backend::Postgres(p) => p.borrow_mut().client()?.batch_execute(if wait {
                "SET synchronous_commit = on"
            } else {
                "SET synchronous_commit = off"
            })?,
        }
        Ok(())
    }

    /// Run `sql` (several statements, no parameters).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.0 {
            Backend::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Backend::Postgres(p) => Ok(p.borrow_mut().client()?.batch_execute(sql)?),
        }
    }

    /// Run one statement; the rows it changed.
    pub fn execute<P: Params>(&self, sql: &str, params: P) -> Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    /// Every row of a query, each through `f`.
    pub fn query_map<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        self.prepare_cached(sql)?.query_map(params, f)
    }

    /// The first row of a query through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    /// Whether a query returns any row.
    pub fn exists<P: Params>(&self, sql: &str, params: P) -> Result<bool> {
        self.prepare_cached(sql)?.exists(params)
    }

    /// A statement to run (maybe many times); prepared once per connection either way.
    pub fn prepare_cached<'a>(&'a self, sql: &str) -> Result<Stmt<'a>> {
        Ok(Stmt(match &self.0 {
            Backend::Sqlite(c) => StmtInner::Sqlite(c.prepare_cached(sql)?),
            Backend::Postgres(p) => StmtInner::Postgres {
                conn: p,
                sql: sql.to_string(),
            },
        }))
    }

    /// A transaction that may write: it waits for the database's write lock first (the
    /// SQLite file's, or the store's advisory lock on PostgreSQL), so two instances'
    /// transactions never interleave.
    pub fn write_tx(&self) -> Result<Tx<'_>> {
        match &self.0 {
            Backend::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE")?,
            Backend::Postgres(p) => {
                let mut p = p.borrow_mut();
                p.client()?.batch_execute("BEGIN")?;
                if let Err(e) = p
                    .c()
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&PG_WRITE_LOCK])
                {
                    let _ = p.c().batch_execute("ROLLBACK");
                    return Err(e.into());
                }
            }
        }
        Ok(Tx {
            db: self,
            done: false,
        })
    }

    /// A transaction. On SQLite it takes the write lock only at its first write; on
    /// PostgreSQL at once, as [`Db::write_tx`].
    pub fn transaction(&self) -> Result<Tx<'_>> {
        match &self.0 {
            Backend::Sqlite(c) => {
                c.execute_batch("BEGIN DEFERRED")?;
                Ok(Tx {
                    db: self,
                    done: false,
                })
            }
            Backend::Postgres(_) => self.write_tx(),
        }
    }
}

/// A statement from [`Db::prepare_cached`]. On SQLite it holds the prepared statement
/// while it lives: a statement run again without going back to the cache keeps its
/// bindings, and SQLite does not prepare again a statement whose plan depends on them
/// (a partial index's condition).
pub struct Stmt<'a>(StmtInner<'a>);

enum StmtInner<'a> {
    Sqlite(rusqlite::CachedStatement<'a>),
    Postgres {
        conn: &'a RefCell<PgConn>,
        sql: String,
    },
}

impl Stmt<'_> {
    /// Run it; the rows it changed.
    pub fn execute<P: Params>(&mut self, params: P) -> Result<usize> {
        let values = params.values();
        match &mut self.0 {
            StmtInner::Sqlite(st) => {
                Ok(st.execute(rusqlite::params_from_iter(values.iter().map(|v| Bind(*v))))?)
            }
            StmtInner::Postgres { conn, sql } => {
                let mut p = conn.borrow_mut();
                let st = p.statement(sql)?;
                let binds = binds(&values);
                Ok(p.c().execute(&st, &pg_refs(&binds))? as usize)
            }
        }
    }

    /// Every row, each through `f`.
    pub fn query_map<T, P: Params>(
        &mut self,
        params: P,
        mut f: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let values = params.values();
        let mut out = Vec::new();
        match &mut self.0 {
            StmtInner::Sqlite(st) => {
                let mut rows =
                    st.query(rusqlite::params_from_iter(values.iter().map(|v| Bind(*v))))?;
                while let Some(r) = rows.next()? {
                    out.push(f(&Row(RowInner::Sqlite(r))));
                }
            }
            StmtInner::Postgres { conn, sql } => {
                // Fetched whole before `f` runs, so `f` may query again.
                let rows = {
                    let mut p = conn.borrow_mut();
                    let st = p.statement(sql)?;
                    let binds = binds(&values);
                    p.c().query(&st, &pg_refs(&binds))?
                };
                out.extend(rows.iter().map(|r| f(&Row(RowInner::Postgres(r)))));
            }
        }
        Ok(out.into_iter())
    }

    /// The first row through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T, P: Params>(
        &mut self,
        params: P,
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        let values = params.values();
        match &mut self.0 {
            StmtInner::Sqlite(st) => {
                let mut rows =
                    st.query(rusqlite::params_from_iter(values.iter().map(|v| Bind(*v))))?;
                match rows.next()? {
                    Some(r) => f(&Row(RowInner::Sqlite(r))),
                    None => Err(Error::NoRows),
                }
            }
            StmtInner::Postgres { conn, sql } => {
                let row = {
                    let mut p = conn.borrow_mut();
                    let st = p.statement(sql)?;
                    let binds = binds(&values);
                    // The first row is what is asked for, as rusqlite's query_row.
                    let mut rows = p.c().query_raw(&st, pg_refs(&binds))?;
                    postgres::fallible_iterator::FallibleIterator::next(&mut rows)?
                };
                match row {
                    Some(r) => f(&Row(RowInner::Postgres(&r))),
                    None => Err(Error::NoRows),
                }
            }
        }
    }

    /// Whether it returns any row.
    pub fn exists<P: Params>(&mut self, params: P) -> Result<bool> {
        self.query_row(params, |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
    }
}

/// An open transaction: rolled back when dropped unless committed.
pub struct Tx<'a> {
    db: &'a Db,
    done: bool,
}

impl Tx<'_> {
    /// Commit it.
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.db.execute_batch("COMMIT")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Nothing to report to: the caller is already returning an error.
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_become_dollars_outside_quotes() {
        assert_eq!(
            dollar_params("SELECT ?2, ?1 FROM t WHERE a = ? AND b = '?' AND c = ?10"),
            "SELECT $2, $1 FROM t WHERE a = $1 AND b = '?' AND c = $10"
        );
    }

    #[test]
    fn numerics_read_as_integers_when_whole() {
        // 123456789 = 1*10000^2 + 2345*10000 + 6789
        let mut raw = Vec::new();
        for w in [3u16, 2, 0, 0, 1, 2345, 6789] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        assert_eq!(numeric(&raw).unwrap(), Value::Int(123_456_789));
        raw[4..6].copy_from_slice(&0x4000u16.to_be_bytes());
        assert_eq!(numeric(&raw).unwrap(), Value::Int(-123_456_789));
        // 1.5 = 1 * 10000^0 + 5000 * 10000^-1, scale 1
        let mut raw = Vec::new();
        for w in [2u16, 0, 0, 1, 1, 5000] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        assert_eq!(numeric(&raw).unwrap(), Value::Real(1.5));
        assert!(numeric(&[0, 1]).is_err());
    }

    #[test]
    fn sqlite_rows_convert_loosely_and_no_row_is_optional() {
        let db = Db::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        db.execute_batch("CREATE TABLE t (a INTEGER, b BLOB, c TEXT, d REAL)")
            .unwrap();
        let blob = [1u8, 2, 3];
        db.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4)",
            params![7i64, blob, "x", 0.5],
        )
        .unwrap();
        let (a, b, c, d): (u64, Vec<u8>, String, f64) = db
            .query_row("SELECT a, b, c, d FROM t", params![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap();
        assert_eq!((a, b, c, d), (7, blob.to_vec(), "x".to_string(), 0.5));
        let none: Option<i64> = db
            .query_row("SELECT a FROM t WHERE a = ?1", params![8i64], |r| r.get(0))
            .optional()
            .unwrap();
        assert_eq!(none, None);
        let bad = db.query_row("SELECT c FROM t", params![], |r| r.get::<_, i64>(0));
        assert!(
            matches!(bad, Err(Error::Column { index: 0, .. })),
            "{bad:?}"
        );
        {
            let tx = db.write_tx().unwrap();
            tx.execute("DELETE FROM t", params![]).unwrap();
        } // dropped: rolled back
        assert!(db.exists("SELECT 1 FROM t", params![]).unwrap());
    }
}
