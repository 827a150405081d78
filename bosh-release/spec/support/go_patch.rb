# Applies go-patch `replace` operations (the ops-file format of the bosh CLI) to a manifest, with
# go-patch's pointer rules: `key`, `key?`, `name=value`, `name=value?`, array indices and `-`,
# where a `?` makes that token and every token after it optional (created when missing).
module GoPatch
  class Error < StandardError; end

  Key = Struct.new(:key, :optional)
  Match = Struct.new(:key, :value, :optional)
  Index = Struct.new(:index)
  Append = Class.new

  UNESCAPE = { '~0' => '~', '~1' => '/', '~2' => '?', '~3' => '=', '~7' => ':' }.freeze

  def self.apply(document, operations)
    operations.reduce(document) do |doc, op|
      raise Error, "unsupported operation type #{op['type'].inspect}" unless op['type'] == 'replace'

      replace(doc, op.fetch('path'), op.fetch('value'))
    end
  end

  def self.parse(path)
    raise Error, "path #{path.inspect} must start with /" unless path.start_with?('/')

    optional = false
    path.split('/', -1).drop(1).map do |raw|
      raise Error, "#{path}: :before/:after/:prev/:next are not supported here" if raw.include?(':')

      if raw == '-'
        Append.new
      elsif raw =~ /\A\d+\z/
        Index.new(raw.to_i)
      else
        optional ||= raw.end_with?('?')
        text = raw.delete_suffix('?')
        key, value = text.split('=', 2).map { |part| part.gsub(/~[01237]/, UNESCAPE) }
        value.nil? ? Key.new(key, optional) : Match.new(key, value, optional)
      end
    end
  end

  def self.replace(document, path, value)
    tokens = parse(path)
    return value if tokens.empty?

    node = document
    tokens.each_cons(2) { |token, after| node = descend(node, token, after, path) }
    assign(node, tokens.last, value, path)
    document
  end

  def self.descend(node, token, after, path)
    case token
    when Key
      raise Error, "#{path}: expected a map at '#{token.key}'" unless node.is_a?(Hash)
      unless node.key?(token.key)
        raise Error, "#{path}: expected to find a map key '#{token.key}'" unless token.optional

        node[token.key] = after.is_a?(Key) ? {} : []
      end
      node[token.key]
    when Match
      found = matches(node, token, path)
      return found.first if found.size == 1

      raise Error, "#{path}: expected exactly one item with #{token.key}=#{token.value}, found #{found.size}" unless found.empty? && token.optional

      item = { token.key => token.value }
      node << item
      item
    when Index
      raise Error, "#{path}: index #{token.index} is out of range" unless node.is_a?(Array) && token.index < node.size

      node[token.index]
    else
      raise Error, "#{path}: '-' may only end a path"
    end
  end

  def self.assign(node, token, value, path)
    case token
    when Key
      raise Error, "#{path}: expected a map at '#{token.key}'" unless node.is_a?(Hash)
      raise Error, "#{path}: expected to find a map key '#{token.key}'" unless node.key?(token.key) || token.optional

      node[token.key] = value
    when Match
      found = matches(node, token, path)
      if found.size == 1
        node[node.index { |item| item.equal?(found.first) }] = value
      elsif found.empty? && token.optional
        node << value
      else
        raise Error, "#{path}: expected exactly one item with #{token.key}=#{token.value}, found #{found.size}"
      end
    when Index
      raise Error, "#{path}: index #{token.index} is out of range" unless node.is_a?(Array) && token.index < node.size

      node[token.index] = value
    when Append
      raise Error, "#{path}: expected an array before '-'" unless node.is_a?(Array)

      node << value
    end
  end

  def self.matches(node, token, path)
    raise Error, "#{path}: expected an array at '#{token.key}=#{token.value}'" unless node.is_a?(Array)

    node.select { |item| item.is_a?(Hash) && item[token.key].to_s == token.value }
  end
end
