//! Flight SQL on the feature server: enough for `adbc_driver_flightsql` and other stock clients to run
//! queries (directly or prepared), list catalogs, schemas, tables and table types, and read table schemas.
//! Every feature view with rows is a table `kiln.features.VIEW`; a query names it by the view's name.
//!
//! Bulk ingestion (`CommandStatementIngest`, ADBC's `cursor.adbc_ingest(SOURCE, table, mode="append")`)
//! pushes the rows into the push source named as the table, exactly as a Flight `DoPut` to
//! `["push", SOURCE]` does: appended offline, written online, acknowledged once durable. Push sources are
//! defined with `kiln features apply`, so ingestion never creates, replaces or drops a table.
//!
//! [`super::FeatureServer`] hands every Flight SQL message (a protobuf `Any` whose type is in
//! `arrow.flight.protocol.sql`) to this service and keeps its own JSON commands for itself.

use std::sync::OnceLock;

use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementIngest, CommandStatementQuery, DoPutUpdateResult, ProstMessageExt,
    SqlInfo, TableExistsOption, TicketStatementQuery,
};
use arrow_flight::{IpcMessage, SchemaAsIpc};
use prost::Message;

use super::*;

pub(super) const CATALOG: &str = "kiln";
pub(super) const SCHEMA: &str = "features";
const SQL_TYPE_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Whether `bytes` are a Flight SQL message (rather than one of the server's JSON commands).
pub(super) fn is_flight_sql(bytes: &[u8]) -> bool {
    Any::decode(bytes).is_ok_and(|any| any.type_url.starts_with(SQL_TYPE_PREFIX))
}

fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut builder = SqlInfoDataBuilder::new();
        builder.append(SqlInfo::FlightSqlServerName, "Kiln feature server");
        builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        // Views are read-only; push sources take rows through bulk ingestion.
        builder.append(SqlInfo::FlightSqlServerReadOnly, false);
        builder.append(SqlInfo::FlightSqlServerBulkIngestion, true);
        builder.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
        builder.append(SqlInfo::FlightSqlServerSql, true);
        builder.append(SqlInfo::FlightSqlServerSubstrait, false);
        builder.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        builder.build().expect("static SQL info builds")
    })
}

/// The Flight SQL side of a [`FeatureServer`].
pub(super) struct SqlService(pub(super) FeatureServer);

fn encoded<E>(schema: SchemaRef, batch: Result<RecordBatch, E>) -> Boxed<FlightData>
where
    FlightError: From<E>,
{
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter([batch.map_err(FlightError::from)]))
        .map_err(Status::from)
        .boxed()
}

/// The push source a Flight SQL `DoPut` command ingests into: a `CommandStatementIngest` naming an
/// existing table (a push source, possibly as `kiln.features.SOURCE`) in append mode. Anything else is
/// refused with what was expected.
pub(super) fn ingest_source(cmd: &[u8]) -> Result<String, Status> {
    let any = Any::decode(cmd).map_err(|error| invalid(format!("the Flight SQL command does not decode: {error}")))?;
    let Some(command) = any
        .unpack::<CommandStatementIngest>()
        .map_err(|error| invalid(format!("the Flight SQL command does not decode: {error}")))?
    else {
        return Err(Status::unimplemented(format!(
            "Flight SQL DoPut of {} is not supported; the feature server takes rows only by bulk ingestion into a push source (CommandStatementIngest)",
            any.type_url
        )));
    };
    if command.transaction_id.is_some() {
        return Err(invalid(
            "bulk ingestion in a transaction is not supported; ingest without one (each ingestion is durable on its own)".into(),
        ));
    }
    if command.temporary {
        return Err(invalid(
            "temporary tables are not supported; ingest into a push source defined with kiln features apply".into(),
        ));
    }
    if command.catalog.as_deref().is_some_and(|catalog| catalog != CATALOG)
        || command.schema.as_deref().is_some_and(|schema| schema != SCHEMA)
    {
        return Err(invalid(format!(
            "table {}.{}.{} is not here; push sources are tables of {CATALOG}.{SCHEMA}",
            command.catalog.as_deref().unwrap_or(CATALOG),
            command.schema.as_deref().unwrap_or(SCHEMA),
            command.table
        )));
    }
    let options = command.table_definition_options.unwrap_or_default();
    let if_exists = TableExistsOption::try_from(options.if_exists).unwrap_or(TableExistsOption::Unspecified);
    if if_exists != TableExistsOption::Append {
        return Err(invalid(format!(
            "ingestion into push source '{}' must append to it (ADBC mode=\"append\"; asked: {}); ingestion never creates or replaces a table, push sources are defined with kiln features apply",
            command.table,
            if_exists.as_str_name()
        )));
    }
    // A missing source is reported by the push itself, naming the sources there are.
    Ok(command.table)
}

/// The acknowledgement of a bulk ingestion: Flight SQL's `DoPutUpdateResult`.
pub(super) fn ingested(rows: usize) -> prost::bytes::Bytes {
    DoPutUpdateResult {
        record_count: rows as i64,
    }
    .encode_to_vec()
    .into()
}

fn info_for(schema: &Schema, descriptor: FlightDescriptor, ticket: Vec<u8>) -> Result<FlightInfo, Status> {
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|error| Status::internal(error.to_string()))?
        .with_descriptor(descriptor)
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket))))
}

fn query_of(handle: &[u8]) -> Result<String, Status> {
    String::from_utf8(handle.to_vec())
        .map_err(|_| invalid("the statement handle is not a query this server issued; expected UTF-8 SQL".into()))
}

impl SqlService {
    async fn statement_schema(&self, query: &str) -> Result<SchemaRef, Status> {
        let command = FlightCommand::Sql { query: query.into() };
        Ok(self.0.plan(&command).await.map_err(status)?.schema())
    }

    async fn statement_rows(&self, query: String) -> Result<Response<Boxed<FlightData>>, Status> {
        let rows = self.0.rows(&FlightCommand::Sql { query }).await.map_err(status)?;
        Ok(Response::new(rows.into_flight()))
    }

    /// Every view with rows, with its schema.
    async fn tables(&self) -> Result<Vec<(String, Schema)>, Status> {
        let registered = self.0.registered();
        let mut tables = Vec::new();
        for view in &registered.definitions.views {
            if let Some(frame) = view_frame(&registered.definitions, view, &self.0.inner.data_dir)
                .await
                .map_err(status)?
            {
                tables.push((view.name.clone(), frame.schema().as_arrow().clone()));
            }
        }
        Ok(tables)
    }
}

#[tonic::async_trait]
impl FlightSqlService for SqlService {
    type FlightService = SqlService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = self.statement_schema(&query.query).await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        let info = info_for(&schema, request.into_inner(), ticket.as_any().encode_to_vec())?;
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        self.statement_rows(query_of(&ticket.statement_handle)?).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let schema = self.statement_schema(&query.query).await?;
        let options = datafusion::arrow::ipc::writer::IpcWriteOptions::default();
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &options)
            .try_into()
            .map_err(|error: datafusion::arrow::error::ArrowError| Status::internal(error.to_string()))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles are the query itself: nothing is held between calls.
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = self
            .statement_schema(&query_of(&command.prepared_statement_handle)?)
            .await?;
        let info = info_for(&schema, request.into_inner(), command.as_any().encode_to_vec())?;
        Ok(Response::new(info))
    }

    async fn do_get_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        self.statement_rows(query_of(&command.prepared_statement_handle)?).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        let info = info_for(&query.into_builder().schema(), request.into_inner(), ticket)?;
        Ok(Response::new(info))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Response::new(encoded(builder.schema(), builder.build())))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        let info = info_for(&query.into_builder().schema(), request.into_inner(), ticket)?;
        Ok(Response::new(info))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(Response::new(encoded(builder.schema(), builder.build())))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        let info = info_for(&query.into_builder().schema(), request.into_inner(), ticket)?;
        Ok(Response::new(info))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        let mut builder = query.into_builder();
        for (name, schema) in self.tables().await? {
            builder
                .append(CATALOG, SCHEMA, name, "TABLE", &schema)
                .map_err(|error| Status::internal(error.to_string()))?;
        }
        Ok(Response::new(encoded(builder.schema(), builder.build())))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        let info = info_for(&query.into_builder().schema(), request.into_inner(), ticket)?;
        Ok(Response::new(info))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        let mut builder = query.into_builder();
        builder.append("TABLE");
        Ok(Response::new(encoded(builder.schema(), builder.build())))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        let info = info_for(
            query.into_builder(sql_info()).schema().as_ref(),
            request.into_inner(),
            ticket,
        )?;
        Ok(Response::new(info))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<Boxed<FlightData>>, Status> {
        let builder = query.into_builder(sql_info());
        Ok(Response::new(encoded(builder.schema(), builder.build())))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
