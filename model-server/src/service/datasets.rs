//! The Datasets service: streamed uploads committed as a whole, and paginated listings.

use super::*;

use pb::upload_dataset_request::Item;

/// One upload message's text bytes: in all, and in its longest text (for the limits).
fn item_sizes(item: &Option<Item>) -> (usize, usize) {
    match item {
        Some(Item::Pair(p)) => (
            p.prompt.len() + p.chosen.len() + p.rejected.len(),
            p.prompt.len().max(p.chosen.len()).max(p.rejected.len()),
        ),
        Some(Item::Text(t)) => (t.text.len(), t.text.len()),
        Some(Item::Prompt(p)) => (p.prompt.len(), p.prompt.len()),
        Some(Item::Header(h)) => (h.name.len(), 0),
        None => (0, 0),
    }
}

/// What one message of an upload is.
#[derive(Debug, PartialEq)]
enum UploadMessage {
    /// The dataset's name (the first message, and only it).
    Header(String),
    Row(Row),
}

/// Reads message `index` (counting rows) of an upload whose header was or was not seen yet.
fn upload_message(
    item: Option<Item>,
    index: usize,
    seen_header: bool,
) -> ServiceResult<UploadMessage> {
    Ok(match item {
        Some(Item::Header(header)) if !seen_header => UploadMessage::Header(header.name),
        Some(Item::Header(_)) => {
            return Err(ServiceError::invalid(
                "header",
                "only the first message may be a header",
            ));
        }
        Some(_) if !seen_header => {
            return Err(ServiceError::invalid(
                "header",
                "an upload starts with its header (the dataset's name)",
            ));
        }
        Some(Item::Pair(p)) => UploadMessage::Row(Row::Pair {
            prompt: p.prompt,
            chosen: p.chosen,
            rejected: p.rejected,
            label: p.label.unwrap_or(1.0),
            chosen_is_human_choice: p.chosen_is_human_choice.unwrap_or(true),
            conflict_prefers_chosen: p.conflict_prefers_chosen,
        }),
        Some(Item::Text(t)) => UploadMessage::Row(Row::Text { text: t.text }),
        Some(Item::Prompt(p)) => UploadMessage::Row(Row::Prompt { prompt: p.prompt }),
        None => {
            return Err(ServiceError::invalid(
                format!("rows[{index}]"),
                "empty message",
            ));
        }
    })
}

/// Writes a batch of rows on a blocking thread (beginning the upload with the first batch) and
/// hands the upload back.
async fn write_rows(
    store: &DatasetStore,
    upload: Option<crate::datasets::DatasetUpload>,
    batch: Vec<Row>,
    name: String,
) -> ServiceResult<crate::datasets::DatasetUpload> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut upload = match upload {
            Some(upload) => upload,
            None => store.begin(&name)?,
        };
        for row in &batch {
            upload.push(row)?;
        }
        Ok::<_, ServiceError>(upload)
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?
}

#[tonic::async_trait]
impl pb::datasets_server::Datasets for DatasetsService {
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let mut stream = request.into_inner();
        self.0
            .unary("UploadDataset", |_| async move {
                // Rows are validated and written to disk in batches of about this many bytes, so
                // an upload holds little memory however large it is.
                const BATCH_BYTES: usize = 4 << 20;
                let mut name = String::new();
                let mut seen_header = false;
                let mut upload = None;
                let mut batch: Vec<Row> = Vec::new();
                let (mut batch_bytes, mut bytes, mut index) = (0usize, 0usize, 0usize);
                let store = self.0.datasets.clone();
                while let Some(message) = stream.next().await {
                    let message =
                        message.map_err(|e| ServiceError::invalid("stream", e.message()))?;
                    let (size, longest_text) = item_sizes(&message.item);
                    bytes += size;
                    self.0.limits.check_upload(bytes)?;
                    self.0.limits.check_row(index, longest_text)?;
                    let row = match upload_message(message.item, index, seen_header)? {
                        UploadMessage::Header(header) => {
                            check_dataset_name(&header)?;
                            name = header;
                            seen_header = true;
                            continue;
                        }
                        UploadMessage::Row(row) => row,
                    };
                    index += 1;
                    batch.push(row);
                    batch_bytes += size;
                    if batch_bytes >= BATCH_BYTES {
                        let rows = std::mem::take(&mut batch);
                        upload = Some(write_rows(&store, upload, rows, name.clone()).await?);
                        batch_bytes = 0;
                    }
                }
                if upload.is_none() && batch.is_empty() {
                    return Err(ServiceError::invalid(
                        "rows",
                        "a dataset needs at least one row",
                    ));
                }
                let upload = write_rows(&store, upload, batch, name).await?;
                // The client may go (cancel, deadline) while the rows are committed: tonic then
                // drops this future, the guard raises the flag, and the store discards its work
                // instead of committing a dataset nobody was told about.
                let abandoned = AbandonOnDrop::default();
                let flag = abandoned.0.clone();
                let meta = tokio::task::spawn_blocking(move || upload.commit(&flag))
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))??;
                abandoned.disarm();
                Ok(dataset_info(meta))
            })
            .await
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let request = request.into_inner();
        let store = self.0.datasets.clone();
        let page_size = match request.page_size {
            0 => MAX_DATASETS_PER_PAGE,
            n => (n as usize).min(MAX_DATASETS_PER_PAGE),
        };
        self.0
            .unary("ListDatasets", |_| async move {
                tokio::task::spawn_blocking(move || store.list())
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))
                    .and_then(|r| r)
                    .map(|list| {
                        // Ids are sorted: a page starts after the token (the last id of the page
                        // before), so pages stay stable while datasets are added.
                        let mut rest = list
                            .into_iter()
                            .filter(|meta| meta.id.as_str() > request.page_token.as_str())
                            .peekable();
                        let datasets: Vec<pb::DatasetInfo> =
                            rest.by_ref().take(page_size).map(dataset_info).collect();
                        let next_page_token = match (rest.peek(), datasets.last()) {
                            (Some(_), Some(last)) => last.id.clone(),
                            _ => String::new(),
                        };
                        pb::ListDatasetsResponse {
                            datasets,
                            next_page_token,
                        }
                    })
            })
            .await
    }
}

/// Datasets per ListDatasets page at most: with names of at most `MAX_DATASET_NAME_BYTES`, a
/// page stays far below the message limit.
pub const MAX_DATASETS_PER_PAGE: usize = 1000;
/// Longest dataset name (bytes) an upload may give.
pub const MAX_DATASET_NAME_BYTES: usize = 256;

/// Dataset names are free-form labels for listings, bounded in length and without control
/// characters (so a name cannot bloat every listing or forge a log line).
fn check_dataset_name(name: &str) -> ServiceResult<()> {
    if name.len() > MAX_DATASET_NAME_BYTES {
        return Err(ServiceError::invalid(
            "header.name",
            format!(
                "{} bytes; a dataset name has at most {MAX_DATASET_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ServiceError::invalid(
            "header.name",
            "control characters are not allowed",
        ));
    }
    Ok(())
}

fn dataset_info(meta: DatasetMeta) -> pb::DatasetInfo {
    // Names stored before names were bounded are cut for listings.
    let mut name = meta.name;
    if name.len() > MAX_DATASET_NAME_BYTES {
        let mut end = MAX_DATASET_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    pb::DatasetInfo {
        id: meta.id,
        name,
        kind: match meta.kind {
            RowKind::Pairs => pb::RowKind::Pairs,
            RowKind::Texts => pb::RowKind::Texts,
            RowKind::Prompts => pb::RowKind::Prompts,
        } as i32,
        rows: meta.rows,
        content_hash: meta.content_hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_starts_with_one_header_then_rows() {
        let header = || Some(Item::Header(pb::DatasetHeader { name: "d".into() }));
        let text = || Some(Item::Text(pb::TextRow { text: "abc".into() }));
        assert_eq!(
            upload_message(header(), 0, false).unwrap(),
            UploadMessage::Header("d".into())
        );
        assert_eq!(
            upload_message(text(), 0, true).unwrap(),
            UploadMessage::Row(Row::Text { text: "abc".into() })
        );
        let field = |result: ServiceResult<UploadMessage>| match result.unwrap_err() {
            ServiceError::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(upload_message(header(), 3, true)), "header");
        assert_eq!(field(upload_message(text(), 0, false)), "header");
        assert_eq!(field(upload_message(None, 7, true)), "rows[7]");
        // A pair without its optional fields: label 1, the human order, no conflict side.
        let pair = Some(Item::Pair(pb::PairRow {
            prompt: "p".into(),
            chosen: "cc".into(),
            rejected: "rrr".into(),
            ..Default::default()
        }));
        assert_eq!(item_sizes(&pair), (6, 3));
        let UploadMessage::Row(Row::Pair {
            label,
            chosen_is_human_choice,
            conflict_prefers_chosen,
            ..
        }) = upload_message(pair, 0, true).unwrap()
        else {
            panic!("not a pair");
        };
        assert_eq!(
            (label, chosen_is_human_choice, conflict_prefers_chosen),
            (1.0, true, None)
        );
        assert_eq!(item_sizes(&header()), (1, 0));
    }
}
