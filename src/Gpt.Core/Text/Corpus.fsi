namespace Gpt.Text

/// Text to train on: the built-in story, or user text from a file, a folder or a glob.
[<RequireQualifiedAccess>]
module Corpus =

    /// One text and where it came from.
    type Document =
        {
          Source: string
          Text: string
        }

    /// The built-in default corpus: "The Harbor Clock of Saltmere", an original short story of about 20,000
    /// characters written for this project, so that the main job needs no download.
    val builtIn: System.Lazy<Document>

    /// Reads a file as strict UTF-8 (a byte-order mark is skipped); invalid bytes are an error naming the file
    /// and the byte offset.
    val readFile: path: string -> Document

    /// The files a path names: a file, every file of a folder (recursively, sorted), or a glob such as
    /// `data/*.txt` or `books/**/*.md`.
    val resolve: path: string -> string array

    /// Loads every document a path names.
    val load: path: string -> Document array

    /// Token ids of documents, joined by the tokenizer's end-of-text token where it has one (GPT-2 marks
    /// document boundaries that way).
    val tokenize:
      tokenizer: ITokenizer -> documents: Document seq -> int array

    /// tokenize, checked to be long enough for at least one training window of contextLength tokens.
    val encode:
      tokenizer: ITokenizer ->
        contextLength: int -> documents: Document seq -> int array
