/// Every failure the port reports: what went wrong, naming the file or parameter and what
/// was expected, so a user with a broken model folder knows which file to look at.
public struct LMPortError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
